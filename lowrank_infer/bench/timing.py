"""Timers: Triton's ``do_bench`` and CUDA graphs on a GPU, ``time.perf_counter`` on a CPU.

Every timer warms its function up first and reports a median, in milliseconds.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from typing import Callable

import torch

__all__ = [
    "capture_graph",
    "cuda_graph_ms",
    "fixed_calls_ms",
    "free_memory",
    "graph_or_eager_ms",
    "median_ms",
    "resolve_device",
    "rotated_graph_ms",
    "rotation_copies",
    "synchronize",
]

# CPU timing: at least this many samples, however slow the function.
_MIN_SAMPLES = 5
_MAX_SAMPLES = 10_000
# A graph-timed case cycles through copies of its operands adding up to this many bytes, 5x the
# H100's 50 MB L2, so that each call reads its weights from HBM as in a real model.
_ROTATION_BYTES = 256 * 2**20
_MAX_COPIES = 2048
# Enough calls per graph that one replay is long next to the timer's resolution.
_MIN_GRAPH_CALLS = 32


def resolve_device(spec: str | None) -> torch.device:
    """``spec`` as a device; ``None`` picks cuda when there is a GPU, else cpu.

    Raises:
        ValueError: a CUDA device is asked for on a machine without one.
    """
    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device (cpu, cuda, cuda:1 …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec} requested but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {spec}: only cpu and cuda are supported")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (host RAM for the CPU); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that reports it
        return None


def free_memory(device: torch.device) -> None:
    """Return freed tensors' memory to the device, so the next measurement starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a host clock sees its end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, rep_ms: float) -> float:
    """Median time of one call of ``fn``, sampled for about ``rep_ms`` milliseconds.

    On CUDA this is ``triton.testing.do_bench``, which also flushes the L2 cache before each
    timed call, so that weights are read from HBM as they would be in a model.

    Args:
        fn: the call to time (no arguments).
        device: where ``fn`` runs.
        rep_ms: sampling budget.
    """
    if device.type == "cuda":
        import triton.testing

        with torch.cuda.device(device):
            return float(triton.testing.do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, return_mode="median"))
    fn()  # warm-up: first-call allocations and lazy initialisation stay out of the samples
    samples: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < _MIN_SAMPLES or (time.perf_counter() < deadline and len(samples) < _MAX_SAMPLES):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def capture_graph(fn: Callable[[], object], warmup: int) -> "torch.cuda.CUDAGraph":
    """One call of ``fn`` captured as a CUDA graph, after ``warmup`` calls on a side stream.

    The warm-up (which torch's CUDA-graph docs require) lets cuBLAS allocate its workspaces
    and Triton compile its kernels outside the capture.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def cuda_graph_ms(calls: list[Callable[[], object]], device: torch.device, rep_ms: float) -> float:
    """Median time of one of ``calls``: all captured in one CUDA graph, replayed, divided.

    Replaying a graph removes the CPU launch overhead that would otherwise dominate small
    decode shapes. Callers pass calls on different input and weight copies, so consecutive
    calls do not find their weights in L2.
    """

    def run_all() -> None:
        for call in calls:
            call()

    with torch.cuda.device(device):
        graph = capture_graph(run_all, warmup=1)
    return median_ms(graph.replay, device, rep_ms) / len(calls)


def rotation_copies(nbytes: int) -> int:
    """How many copies of a call's operands (``nbytes`` each) a graph-timed case cycles through."""
    return min(_MAX_COPIES, -(-_ROTATION_BYTES // nbytes))


def rotated_graph_ms(calls: list[Callable[[], object]], device: torch.device, rep_ms: float) -> float:
    """:func:`cuda_graph_ms` of ``calls`` (one per operand copy, see :func:`rotation_copies`),
    repeated until one graph holds at least ``_MIN_GRAPH_CALLS`` calls."""
    return cuda_graph_ms(calls * -(-_MIN_GRAPH_CALLS // len(calls)), device, rep_ms)


def graph_or_eager_ms(calls: list[Callable[[], object]], device: torch.device, rep_ms: float,
                      label: str) -> tuple[float, str]:
    """``(median ms, timer name)``: :func:`rotated_graph_ms`, or, when a CUDA graph cannot be
    captured, eager timing of the first call (still a number, but the timer name shows that launch
    overhead is in it; the reason is printed, prefixed by ``label``)."""
    try:
        return rotated_graph_ms(calls, device, rep_ms), "cuda_graph"
    except RuntimeError as err:
        print(f"  {label}: CUDA graph capture failed, timing eagerly: {str(err).splitlines()[0]}",
              file=sys.stderr, flush=True)
        return median_ms(calls[0], device, rep_ms), "do_bench"


def _elapsed_ms(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) * 1e3


def fixed_calls_ms(fn: Callable[[], object], device: torch.device, calls: int, trials: int) -> float:
    """Median over ``trials`` of the mean time of ``calls`` back-to-back calls of ``fn``.

    Unlike :func:`median_ms`, ``fn`` runs exactly ``(trials + 1) * calls`` times (one untimed
    warm-up trial), which a decode step writing into a fixed-size KV cache needs.
    """
    synchronize(device)
    _elapsed_ms(fn, calls, device)
    return statistics.median(_elapsed_ms(fn, calls, device) / calls for _ in range(trials))
