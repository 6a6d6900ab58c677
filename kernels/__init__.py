"""Fused low-rank linear kernels and their dispatch (imported as ``lowrank_infer.kernels``)."""

from lowrank_infer.cost import use_dense
from lowrank_infer.kernels.gated_op import ACTIVATIONS, lowrank_gated_linear
from lowrank_infer.kernels.grouped_op import lowrank_grouped_linear
from lowrank_infer.kernels.lowrank_linear_op import (
    BACKENDS,
    get_backend,
    get_pdl,
    lowrank_linear,
    set_backend,
    set_pdl,
    triton_gated_linear,
    triton_grouped_linear,
    triton_lowrank_linear,
    use_backend,
)
from lowrank_infer.kernels.reference import torch_lowrank_linear, two_matmul_linear
from lowrank_infer.kernels.validation import check_factors

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "check_factors",
    "get_backend",
    "get_pdl",
    "lowrank_gated_linear",
    "lowrank_grouped_linear",
    "lowrank_linear",
    "set_backend",
    "set_pdl",
    "torch_lowrank_linear",
    "triton_gated_linear",
    "triton_grouped_linear",
    "triton_lowrank_linear",
    "two_matmul_linear",
    "use_backend",
    "use_dense",
]
