"""Input checks shared by ``lowrank_linear`` and ``triton_lowrank_linear``."""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_DTYPES", "check_lowrank_inputs"]

# What the Triton kernels compute in (fp32 accumulation); the torch path accepts the same
# set so the two paths never disagree about what is valid.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_lowrank_inputs(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Raise ``ValueError`` naming the offending tensors and their shapes.

    Args:
        x: ``[..., n]`` activations.
        U: ``[m, k]`` left factor.
        V: ``[n, k]`` right factor.
        bias: optional ``[m]``.
    """
    named = {"x": x, "U": U, "V": V} | ({} if bias is None else {"bias": bias})

    def fail(problem: str) -> None:
        shapes = ", ".join(f"{name} {list(t.shape)}" for name, t in named.items())
        raise ValueError(f"lowrank_linear: {problem} (got {shapes})")

    if U.dim() != 2 or V.dim() != 2 or x.dim() < 1 or (bias is not None and bias.dim() != 1):
        fail("expected x [..., n], U [m, k], V [n, k] and bias [m]")
    if U.numel() == 0 or V.numel() == 0:
        fail("U and V must be non-empty (m, n, k >= 1)")
    if x.shape[-1] != V.shape[0]:
        fail("x's last dim must equal V's rows (n)")
    if U.shape[1] != V.shape[1]:
        fail("U and V must have the same rank (columns, k)")
    if bias is not None and bias.shape[0] != U.shape[0]:
        fail("bias length must equal U's rows (m)")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1 or x.dtype not in SUPPORTED_DTYPES:
        fail(f"x, U, V and bias need one dtype among float16/bfloat16/float32, got {dtypes}")
    devices = {name: str(t.device) for name, t in named.items()}
    if len(set(devices.values())) > 1:
        fail(f"x, U, V and bias must be on one device, got {devices}")
