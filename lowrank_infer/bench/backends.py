"""The one vocabulary of both benches: what computes a layer, and the names older result files use.

``dense`` is the dense baseline (``F.linear`` inside ``nn.Linear``); every other name is a
backend of :func:`lowrank_infer.kernels.set_backend`, timed through ``lowrank_linear``, the
registered op that a compressed model runs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from lowrank_infer.kernels import BACKENDS as KERNEL_BACKENDS
from lowrank_infer.kernels import get_pdl, set_pdl, use_backend

__all__ = ["BACKENDS", "CPU_BACKENDS", "LEGACY_NAMES", "TRITON_BACKENDS", "backend_of", "check_backends", "running"]

BACKENDS = ("dense", *KERNEL_BACKENDS)
# Result files written before the benches ran the library's backends call them so. Their
# Triton rows (fused or triton) ran the Triton kernels at every token count: what the backend
# triton_fp32 runs now, triton being the Triton decode plus cuBLAS above 32 tokens.
LEGACY_NAMES = {"two_matmul": "cublas", "torch_lowrank": "torch", "fused": "triton"}
# Off CUDA, lowrank_linear runs torch math whatever the backend: other names would mislabel it.
CPU_BACKENDS = ("dense", "torch")
# The backends that launch the Triton kernels, the only ones programmatic dependent launch changes.
TRITON_BACKENDS = ("triton", "triton_fp32")


def check_backends(names: list[str], device: torch.device) -> list[str]:
    """``names`` if each is in :data:`BACKENDS` and runs as itself on ``device``.

    Raises:
        ValueError: an unknown name, or a CUDA-only backend on another device.
    """
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend {', '.join(map(repr, unknown))} (known: {', '.join(BACKENDS)})")
    cuda_only = [name for name in names if name not in CPU_BACKENDS]
    if device.type != "cuda" and cuda_only:
        raise ValueError(f"on {device.type}, lowrank_linear runs torch math whatever the backend, so "
                         f"{', '.join(cuda_only)} would time torch under another name: use {', '.join(CPU_BACKENDS)}")
    return names


@contextlib.contextmanager
def running(name: str, pdl: bool | None = None) -> Iterator[None]:
    """Inside the block, every ``lowrank_linear`` call runs backend ``name`` (``dense``: unchanged),
    and the Triton kernels launch with programmatic dependent launch when ``pdl`` is True (None:
    unchanged); both come back after."""
    pdl_before = get_pdl()
    with contextlib.nullcontext() if name == "dense" else use_backend(name):
        if pdl is not None:
            set_pdl(pdl)
        try:
            yield
        finally:
            set_pdl(pdl_before)


def backend_of(row: dict) -> str:
    """The backend of a result row of any version: older rows say ``provider`` or ``path`` and old names."""
    name = row.get("backend", row.get("provider", row.get("path")))
    return LEGACY_NAMES.get(name, name)
