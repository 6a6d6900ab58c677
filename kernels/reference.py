"""Torch implementations of ``y = U·(Vᵀx) + b``: the CPU path and the cuBLAS backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["torch_lowrank_linear", "two_matmul_linear"]


def torch_lowrank_linear(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x @ V) @ U.T + bias`` with the ``[..., k]`` intermediate kept in float32.

    Args:
        x: ``[..., n]`` activations.
        U: ``[m, k]`` left factor.
        V: ``[n, k]`` right factor.
        bias: optional ``[m]``.
    """
    z = x.float() @ V.float()
    return F.linear(z, U.float(), None if bias is None else bias.float()).to(x.dtype)


def two_matmul_linear(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x @ V) @ U.T + bias`` as two plain matmuls in the input dtype (cuBLAS on CUDA).

    The intermediate is rounded to the input dtype, as in two ``nn.Linear`` calls.
    """
    return F.linear(x @ V, U, bias)
