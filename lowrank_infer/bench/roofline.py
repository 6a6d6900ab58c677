"""Roofline: the machine's peaks, measured in the same run, and what a layer must move and compute.

Peaks are measured, not taken from a data sheet, so that a fraction of the roofline compares
a kernel with what this GPU (clocks, power cap, MIG slice) actually delivers today.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lowrank_infer.bench.timing import median_ms
from lowrank_infer.cost import layer_params

__all__ = ["Peaks", "layer_cost", "measure_peaks", "throughput"]

# Sizes of the peak measurements: far larger than the GPU's L2 (50 MB on H100), small on CPU.
_COPY_BYTES = {"cuda": 2**30, "cpu": 2**26}
_MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}


@dataclass(frozen=True)
class Peaks:
    """Measured peak memory bandwidth and matmul throughput of one device and dtype."""

    bandwidth_gbs: float
    matmul_tflops: float
    copy_bytes: int
    matmul_size: int
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def measure_peaks(device: torch.device, dtype: torch.dtype, rep_ms: float) -> Peaks:
    """Peak bandwidth (a large device-to-device copy, read + write bytes) and peak matmul
    throughput (a large square matmul in ``dtype``).

    Args:
        device: the device to measure.
        dtype: dtype of the matmul (and of the copy's elements).
        rep_ms: sampling budget of each timer.
    """
    numel = _COPY_BYTES[device.type] // dtype.itemsize
    src = torch.randn(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, rep_ms)
    del src, dst
    size = _MATMUL_SIZE[device.type]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul_ms = median_ms(lambda: a @ b, device, rep_ms)
    copy_bytes = 2 * numel * dtype.itemsize
    return Peaks(
        bandwidth_gbs=copy_bytes / copy_ms / 1e6, matmul_tflops=2 * size**3 / matmul_ms / 1e9,
        copy_bytes=copy_bytes, matmul_size=size, dtype=str(dtype).removeprefix("torch."),
    )


def layer_cost(m: int, n: int, k: int | None, tokens: int, elem_bytes: int) -> tuple[int, int]:
    """``(bytes, flops)`` of one layer call on ``tokens`` rows; ``k`` None means dense.

    Bytes count what must cross HBM at least once: x, the weights (W, or U and V) and y. The
    low-rank intermediate ``x @ V`` is not counted: the Triton kernels keep it on chip, and for
    the two-matmul backends its round trip is overhead the roofline should expose.
    """
    weights = layer_params(m, n, k)
    flops = 2 * tokens * weights
    return (tokens * n + weights + tokens * m) * elem_bytes, flops


def throughput(ms: float, nbytes: int, flops: int, peaks: Peaks) -> dict:
    """Achieved GB/s and TFLOP/s of a call taking ``ms``, and its fractions of the roofline.

    ``roofline_frac`` is the roofline's lower bound on the time (bytes at peak bandwidth or
    flops at peak throughput, whichever is longer) divided by the measured time.
    """
    gbs = nbytes / ms / 1e6
    tflops = flops / ms / 1e9
    bound_ms = max(nbytes / (peaks.bandwidth_gbs * 1e6), flops / (peaks.matmul_tflops * 1e9))
    return {
        "gbs": gbs, "tflops": tflops, "mem_frac": gbs / peaks.bandwidth_gbs,
        "compute_frac": tflops / peaks.matmul_tflops, "roofline_frac": bound_ms / ms,
    }
