"""The dtype of the forward passes that train or record training targets; statistics never change dtype.

Recording the dense model's healing targets, ARA's mask training, block refinement (with the
dense and compressed block streams it reads, where no closed form is fitted on them) and healing
spend nearly all their time in matmuls whose results only steer (a gradient step, a held-out
score). On hardware with native bfloat16 matmuls they run 1.2-1.8x faster under bfloat16
autocast, and the dense model's own next-token distribution moves by a KL of under 0.001 nats
(SmolLM2-135M: 0.0006, against 0.3 for the compression itself). The calibration statistics
(``XᵀX``, float64), the closed-form refits, the factorizations, the sampling of generated
calibration windows (so that they do not depend on the compute dtype or the hardware) and every evaluation stay in the model's dtype or wider: this module is only entered
around the passes listed above. On a CPU their causal attention then runs through
:mod:`lowrank_infer.cpu_attention`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

__all__ = ["COMPUTE_DTYPES", "autocast", "check_compute_dtype", "frozen_weights_cast", "native_bfloat16",
           "resolve_compute_dtype"]

COMPUTE_DTYPES = ("float32", "bfloat16")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def check_compute_dtype(name: str) -> str:
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return name


@functools.cache
def _cpu_flags() -> frozenset[str]:
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split())


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (faster than float32): a CUDA GPU
    that supports bfloat16, or a CPU with AVX512-BF16 or AMX (elsewhere bfloat16 is emulated, slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in _cpu_flags() for flag in _CPU_BF16_FLAGS)
    return False


def resolve_compute_dtype(name: str, device: torch.device | str) -> str:
    """``"auto"``: ``"bfloat16"`` where :func:`native_bfloat16`, else ``"float32"``; other names are checked."""
    if name == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return check_compute_dtype(name)


def autocast(compute_dtype: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``compute_dtype`` on ``device``'s type; nothing for ``"float32"``."""
    if check_compute_dtype(compute_dtype) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, compute_dtype))


@contextlib.contextmanager
def frozen_weights_cast(model: nn.Module, compute_dtype: str, kinds: tuple[type, ...] = (nn.Linear,)) -> Iterator[None]:
    """While it lasts, the frozen ``weight`` of every ``kinds`` module of ``model`` (layers that
    apply it with ``F.linear``) holds its ``compute_dtype`` values, and its own values again afterwards.

    Autocast keeps its casts only of weights that train; a frozen float32 weight is cast again at
    every forward pass, which on a CPU is a pass over memory per layer and step (healing SmolLM2 at
    keep 0.8 keeps 59.5 M of its weights dense and frozen). A linear layer under autocast computes
    exactly as before with its weight already cast. Embedding tables (and any linear weight tied to
    one) stay: a lookup returns the table's dtype, which would move the residual stream to bfloat16.
    """
    if check_compute_dtype(compute_dtype) == "float32":
        yield
        return
    dtype = getattr(torch, compute_dtype)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    saved = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, kinds) and weight is not None and not weight.requires_grad
                and weight.dtype == torch.float32 and id(weight) not in tables):
            saved.append((weight, weight.data))
            weight.data = weight.data.to(dtype)
    try:
        yield
    finally:
        for weight, data in saved:
            weight.data = data
