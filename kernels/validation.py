"""Input checks: factors once when a layer is built, activations on every call.

``lowrank_linear`` runs per layer per token, so its per-call check is a few comparisons and
formats a message only when one fails; everything about the factors alone is checked once,
by :func:`check_factors`, when a ``LowRankLinear`` is built.
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_DTYPES", "check_factors", "check_input"]

# What the Triton kernels compute in (fp32 accumulation); the torch path accepts the same
# set so the two paths never disagree about what is valid.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_factors(U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Check that the factors of ``W ≈ U @ V.T`` (and the bias) fit together.

    Args:
        U: ``[m, k]`` left factor.
        V: ``[n, k]`` right factor.
        bias: optional ``[m]``.

    Raises:
        ValueError: shapes, dtypes or devices do not fit together; the message names the
            problem and every tensor's shape.
    """
    problem = _factor_problem(U, V, bias)
    if problem is not None:
        raise ValueError(f"low-rank factors: {problem} (got {_shapes(U=U, V=V, bias=bias)})")


def _factor_problem(U, V, bias) -> str | None:
    if U.dim() != 2 or V.dim() != 2 or (bias is not None and bias.dim() != 1):
        return "expected U [m, k], V [n, k] and bias [m]"
    if U.numel() == 0 or V.numel() == 0:
        return "U and V must be non-empty (m, n, k >= 1)"
    if U.shape[1] != V.shape[1]:
        return "U and V must share k (their number of columns, the rank)"
    if bias is not None and bias.shape[0] != U.shape[0]:
        return "bias length must equal U's rows (m)"
    named = {"U": U, "V": V} | ({} if bias is None else {"bias": bias})
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1 or U.dtype not in SUPPORTED_DTYPES:
        return f"U, V and bias need one dtype among float16/bfloat16/float32, got {_listed(dtypes)}"
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        return f"U, V and bias must be on one device, got {_listed(devices)}"
    return None


def check_input(x: torch.Tensor, V: torch.Tensor) -> None:
    """Per-call check of activations ``x [..., n]`` against the right factor ``V [n, k]``.

    Only what can change from call to call: ``x``'s last dim, dtype and device. The
    comparisons are cheap; the message is built only when one fails.

    Args:
        x: ``[..., n]`` activations.
        V: ``[n, k]`` right factor, already accepted by :func:`check_factors`.

    Raises:
        ValueError: ``x`` does not fit ``V``.
    """
    if (not x.dim() or x.shape[-1] != V.shape[0] or x.dtype != V.dtype
            or x.device != V.device or x.dtype not in SUPPORTED_DTYPES):
        raise ValueError(f"lowrank_linear: {_input_problem(x, V)} "
                         f"(got {_shapes(x=x, V=V)})")


def _input_problem(x, V) -> str:
    if not x.dim() or x.shape[-1] != V.shape[0]:
        return "x's last dim must equal V's rows (n)"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"x is {x.dtype}; expected float16, bfloat16 or float32"
    if x.dtype != V.dtype:
        return f"x is {x.dtype} but the factors are {V.dtype}"
    return f"x is on {x.device} but the factors are on {V.device}"


def _shapes(**tensors: torch.Tensor | None) -> str:
    return ", ".join(f"{name} {list(t.shape)}" for name, t in tensors.items() if t is not None)


def _listed(values: dict) -> str:
    return ", ".join(f"{name} {value}" for name, value in values.items())
