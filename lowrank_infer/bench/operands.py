"""Random operands of one layer call, their float64 reference, and the check a backend must pass.

Every backend is checked against the reference before it is timed, so a broken kernel is
reported as failed instead of timed.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["TOLERANCE", "check_call", "check_value", "make_operands", "reference", "relative_error"]

# Relative Frobenius error vs float64 above which a call has failed. Looser than the kernel
# tests' bounds: large-n layers accumulate more rounding, and the check is there to catch
# broken results (errors of order 1), not to grade accuracy.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2.5e-2}


def make_operands(
    m: int, n: int, k: int | None, tokens: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Random ``(x, U, V)``, or ``(x, W)`` when ``k`` is None, scaled so that ``y`` is O(1).

    Random, not zeros or constants: hardware and libraries can take shortcuts on those.
    """
    x = torch.randn(tokens, n, device=device, dtype=dtype)
    if k is None:
        return x, torch.randn(m, n, device=device, dtype=dtype) / n**0.5
    U = torch.randn(m, k, device=device, dtype=dtype) / k**0.5
    V = torch.randn(n, k, device=device, dtype=dtype) / n**0.5
    return x, U, V


def reference(operands: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The float64 result of ``operands`` (as made by :func:`make_operands`)."""
    x, *weights = (t.double() for t in operands)
    if len(weights) == 1:
        return x @ weights[0].T
    U, V = weights
    return (x @ V) @ U.T


def check_call(fn: Callable[..., torch.Tensor], operands: tuple[torch.Tensor, ...], ref: torch.Tensor) -> str | None:
    """``None`` when ``fn(*operands)`` matches ``ref`` within :data:`TOLERANCE`, else why not.

    An exception raised by ``fn`` is a failure too: the benchmark goes on without it.
    """
    return check_value(lambda: fn(*operands), operands[0].dtype, ref)


def check_value(compute: Callable[[], torch.Tensor], dtype: torch.dtype, ref: torch.Tensor) -> str | None:
    """``None`` when ``compute()`` is a ``dtype`` tensor within :data:`TOLERANCE` of ``ref``, else why not."""
    try:
        y = compute()
    except Exception as err:  # noqa: BLE001 - any error fails this backend, not the run
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    if y.shape != ref.shape or y.dtype != dtype:
        return f"returned {y.dtype} {list(y.shape)}, expected {dtype} {list(ref.shape)}"
    err = relative_error(y, ref)
    if not err < TOLERANCE[dtype]:  # also catches NaN
        return f"relative error {err:.3g} > {TOLERANCE[dtype]:g}"
    return None


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖y − ref‖ / ‖ref‖`` (Frobenius), computed in float64."""
    ref = ref.double()
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
