"""Fused low-rank linear kernels and their dispatch (imported as ``lowrank_infer.kernels``)."""

from lowrank_infer.kernels.lowrank_linear_op import (
    BACKENDS,
    get_backend,
    lowrank_linear,
    set_backend,
    triton_lowrank_linear,
)
from lowrank_infer.kernels.reference import torch_lowrank_linear, two_matmul_linear


def use_dense(m: int, n: int, k: int) -> bool:
    """True when a rank-``k`` factorization of an ``m×n`` weight is not smaller.

    That is ``k·(m+n) ≥ m·n``: such a layer keeps its dense weight.
    """
    return k * (m + n) >= m * n


__all__ = [
    "BACKENDS",
    "get_backend",
    "lowrank_linear",
    "set_backend",
    "torch_lowrank_linear",
    "triton_lowrank_linear",
    "two_matmul_linear",
    "use_dense",
]
