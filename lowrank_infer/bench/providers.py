"""The ways to compute one layer that ``bench kernels`` compares, their inputs and their check.

A provider is ``fn(x, *weights)``: weights ``(U, V)`` for a low-rank provider, ``(W,)`` for
dense. Every provider is checked against a float64 reference before it is timed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lowrank_infer.kernels import torch_lowrank_linear, two_matmul_linear

__all__ = [
    "PROVIDERS",
    "TOLERANCE",
    "Provider",
    "check_provider",
    "default_providers",
    "make_operands",
    "reference",
    "resolve_providers",
]

# Relative Frobenius error vs float64 above which a provider has failed. Looser than the
# kernel tests' bounds: large-n layers accumulate more rounding, and the check is there to
# catch broken results (errors of order 1), not to grade accuracy.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2.5e-2}


@dataclass(frozen=True)
class Provider:
    """A named implementation: ``fn(x, U, V)``, or ``fn(x, W)`` when ``dense``.

    ``prepare`` re-lays out an operand set once, before checking and timing (e.g. another
    storage order of the factors); the values, and so the reference, stay the same.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    dense: bool = False
    prepare: Callable[[tuple], tuple] | None = None


def _dense(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return F.linear(x, W)


def _triton(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    # Imported here: the launcher may be missing or broken, which fails this provider only.
    from lowrank_infer.kernels import triton_lowrank_linear

    return triton_lowrank_linear(x, U, V)


def _rank_major(operands: tuple) -> tuple:
    """The factors stored rank-major (``Uᵀ [k, m]``, ``Vᵀ [k, n]`` contiguous), passed as views.

    The kernels take any strides; this layout makes each decode k-slice one contiguous read.
    """
    x, U, V = operands
    return x, U.T.contiguous().T, V.T.contiguous().T


PROVIDERS = {
    provider.name: provider
    for provider in (
        Provider("dense", _dense, dense=True),  # F.linear: cuBLAS on CUDA
        Provider("torch_lowrank", torch_lowrank_linear),  # two matmuls, fp32 intermediate
        Provider("two_matmul", two_matmul_linear),
        Provider("triton", _triton),  # the fused kernels
        Provider("triton_rank_major", _triton, prepare=_rank_major),  # same, factors stored k-major
    )
}


def default_providers(device: torch.device) -> list[str]:
    """All providers on CUDA; on CPU Triton only when its interpreter is switched on (slow)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return [name for name in PROVIDERS if not name.startswith("triton")]
    return list(PROVIDERS)


def resolve_providers(names: list[str]) -> list[Provider]:
    """The providers called ``names``.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    unknown = [name for name in names if name not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider {', '.join(map(repr, unknown))} (known: {', '.join(PROVIDERS)})")
    return [PROVIDERS[name] for name in names]


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


def check_provider(provider: Provider, operands: tuple[torch.Tensor, ...], ref: torch.Tensor) -> str | None:
    """``None`` when ``provider`` computes ``ref`` within :data:`TOLERANCE`, else why it failed.

    An exception raised by the provider is a failure too: the benchmark goes on without it.
    """
    try:
        y = provider.fn(*operands)
    except Exception as err:  # noqa: BLE001 - any error fails this provider, not the run
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    x = operands[0]
    if y.shape != ref.shape or y.dtype != x.dtype:
        return f"returned {y.dtype} {list(y.shape)}, expected {x.dtype} {list(ref.shape)}"
    err = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    if not err < TOLERANCE[x.dtype]:  # also catches NaN
        return f"relative error {err:.3g} > {TOLERANCE[x.dtype]:g}"
    return None
