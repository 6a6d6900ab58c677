"""Fused low-rank linear kernels and their dispatch (imported as ``lowrank_infer.kernels``)."""

from lowrank_infer.cost import use_dense
from lowrank_infer.kernels.grouped_op import lowrank_grouped_linear
from lowrank_infer.kernels.lowrank_linear_op import (
    BACKENDS,
    get_backend,
    lowrank_linear,
    set_backend,
    triton_lowrank_linear,
    use_backend,
)
from lowrank_infer.kernels.reference import torch_lowrank_linear, two_matmul_linear
from lowrank_infer.kernels.validation import check_factors

__all__ = [
    "BACKENDS",
    "check_factors",
    "get_backend",
    "lowrank_grouped_linear",
    "lowrank_linear",
    "set_backend",
    "torch_lowrank_linear",
    "triton_lowrank_linear",
    "two_matmul_linear",
    "use_backend",
    "use_dense",
]
