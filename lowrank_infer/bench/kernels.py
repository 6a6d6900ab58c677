"""``bench kernels``: every backend on every layer shape, rank and token count, checked then timed."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowrank_infer.allocation import check_keep, uniform_rank
from lowrank_infer.bench.backends import running
from lowrank_infer.bench.operands import check_call, make_operands, reference
from lowrank_infer.bench.output import Column, add_speedups, markdown_table
from lowrank_infer.bench.roofline import Peaks, layer_cost, throughput
from lowrank_infer.bench.shapes import LayerShape
from lowrank_infer.bench.timing import free_memory, graph_or_eager_ms, median_ms, rotation_copies
from lowrank_infer.cost import layer_params, use_dense
from lowrank_infer.kernels import lowrank_linear

__all__ = ["GRAPH_MAX_TOKENS", "KernelSettings", "layer_rank", "markdown_report", "run_kernel_bench"]

# Decode-sized calls (up to this many tokens) are timed as CUDA-graph replays: eagerly their
# CPU launch overhead would be measured instead of the GPU.
GRAPH_MAX_TOKENS = 16


def layer_rank(m: int, n: int, keep: float, multiple_of: int = 1) -> int:
    """The uniform rank of an ``m×n`` layer at ``keep`` (:func:`uniform_rank`), rounded down to a
    multiple of ``multiple_of`` (at least one multiple).

    One layer is timed alone, so no budget is repaired across layers: the row reports the
    fraction its rank actually keeps.

    Raises:
        ValueError: ``keep`` is outside (0, 1], or the rank reaches break-even (dense).
    """
    rank = max(multiple_of, uniform_rank(m, n, check_keep(keep)) // multiple_of * multiple_of)
    if use_dense(m, n, rank):
        raise ValueError(f"keep {keep} with multiple_of {multiple_of} leaves a {m}x{n} layer dense "
                         f"(rank {rank}): pick a smaller keep or multiple_of")
    return rank


@dataclass(frozen=True)
class KernelSettings:
    """What to time: shapes × (keep, rank) × token counts × backends, on one device and dtype."""

    ranks: dict[LayerShape, list[tuple[float, int]]]  # shape -> [(keep, rank)]
    tokens: list[int]
    backends: list[str]
    device: torch.device
    dtype: torch.dtype
    rep_ms: float


def run_kernel_bench(settings: KernelSettings, peaks: Peaks) -> list[dict]:
    """One result row per (shape, tokens, backend[, keep]); dense rows are independent of keep.

    Args:
        settings: the grid to time.
        peaks: this run's measured peaks, for roofline fractions.
    """
    dense = [name for name in settings.backends if name == "dense"]
    lowrank = [name for name in settings.backends if name != "dense"]
    rows: list[dict] = []
    for shape, ranks in settings.ranks.items():
        for tokens in settings.tokens:
            if dense:
                rows += _bench_group(dense, shape, None, None, tokens, settings, peaks)
            if lowrank:
                for keep, k in ranks:
                    rows += _bench_group(lowrank, shape, keep, k, tokens, settings, peaks)
    add_speedups(rows, ("model", "layer", "tokens"))
    return rows


def _copies(shape: LayerShape, k: int | None, tokens: int, settings: KernelSettings) -> int:
    """How many operand copies a graph-timed case cycles through (1 when timed eagerly)."""
    if settings.device.type != "cuda" or tokens > GRAPH_MAX_TOKENS:
        return 1
    nbytes, _ = layer_cost(shape.m, shape.n, k, tokens, settings.dtype.itemsize)
    return rotation_copies(nbytes)


def _bench_group(
    backends: list[str], shape: LayerShape, keep: float | None, k: int | None, tokens: int,
    settings: KernelSettings, peaks: Peaks,
) -> list[dict]:
    """Rows of ``backends`` that share one case's operands and float64 reference."""
    base = {"model": shape.model, "layer": shape.layer, "m": shape.m, "n": shape.n, "k": k, "keep": keep,
            "keep_achieved": layer_params(shape.m, shape.n, k) / (shape.m * shape.n), "tokens": tokens,
            "dtype": str(settings.dtype).removeprefix("torch.")}
    try:
        sets = [make_operands(shape.m, shape.n, k, tokens, settings.dtype, settings.device)
                for _ in range(_copies(shape, k, tokens, settings))]
        ref = reference(sets[0])
    except torch.cuda.OutOfMemoryError as err:
        return [_failed({**base, "backend": name}, f"inputs: {err}") for name in backends]
    rows = []
    for name in backends:
        with running(name):
            rows.append(_bench_backend(sets, ref, {**base, "backend": name}, settings, peaks))
    del sets, ref
    free_memory(settings.device)
    return rows


def _bench_backend(sets: list[tuple], ref: torch.Tensor, row: dict, settings: KernelSettings, peaks: Peaks) -> dict:
    """Check, then time, one backend's call on ``sets`` (already switched to that backend)."""
    fn = F.linear if row["backend"] == "dense" else lowrank_linear
    failure = check_call(fn, sets[0], ref)
    if failure is None:
        try:
            row["median_ms"], row["timer"] = _time(fn, sets, row, settings)
        except Exception as err:  # noqa: BLE001 - a failed timing fails this row, not the run
            failure = f"timing: {type(err).__name__}: {err}"[:200]
    if failure is not None:
        row = _failed(row, failure)
    else:
        nbytes, flops = layer_cost(row["m"], row["n"], row["k"], row["tokens"], settings.dtype.itemsize)
        row.update(throughput(row["median_ms"], nbytes, flops, peaks), status="ok")
    _progress(row)
    return row


def _time(fn, sets: list[tuple], row: dict, settings: KernelSettings) -> tuple[float, str]:
    """``(median ms, timer name)`` of one call of ``fn``."""
    if settings.device.type == "cpu":
        return median_ms(functools.partial(fn, *sets[0]), settings.device, settings.rep_ms), "perf_counter"
    if row["tokens"] > GRAPH_MAX_TOKENS:
        return median_ms(functools.partial(fn, *sets[0]), settings.device, settings.rep_ms), "do_bench"
    calls = [functools.partial(fn, *ops) for ops in sets]
    return graph_or_eager_ms(calls, settings.device, settings.rep_ms, row["backend"])


def _failed(row: dict, reason: str) -> dict:
    return {**row, "median_ms": None, "timer": None, "gbs": None, "tflops": None, "mem_frac": None,
            "compute_frac": None, "roofline_frac": None, "status": f"failed: {reason}"}


def _progress(row: dict) -> None:
    keep = "dense" if row["keep"] is None else f"keep {row['keep']}"
    timing = f"{row['median_ms']:.4f} ms" if row["median_ms"] is not None else row["status"]
    print(f"  {row['model']} {row['layer']} {row['m']}x{row['n']} {keep} T={row['tokens']} "
          f"{row['backend']}: {timing}", file=sys.stderr, flush=True)


_COLUMNS: list[Column] = [
    ("model", "model", str), ("layer", "layer", str), ("m", "m", str), ("n", "n", str), ("k", "k", str),
    ("keep", "keep", str), ("T", "tokens", str), ("backend", "backend", str), ("timer", "timer", str),
    ("ms", "median_ms", lambda v: f"{v:.4f}"), ("GB/s", "gbs", lambda v: f"{v:.0f}"),
    ("TFLOP/s", "tflops", lambda v: f"{v:.1f}"), ("roofline", "roofline_frac", lambda v: f"{v:.0%}"),
    ("x dense", "speedup_vs_dense", lambda v: f"{v:.2f}"), ("status", "status", str),
]


def markdown_report(document: dict) -> str:
    """The results of a ``bench kernels`` document as a titled markdown table."""
    env, peaks = document["environment"], document["peaks"]
    head = [
        f"## lowrank-infer bench kernels: {env['device_label']}, {document['dtype']}", "",
        f"Measured peaks: {peaks['bandwidth_gbs']:.0f} GB/s (device copy, read + write), "
        f"{peaks['matmul_tflops']:.1f} TFLOP/s ({peaks['matmul_size']}^3 matmul). "
        f"torch {env['torch']}, triton {env['triton']}. Roofline = max(bytes / peak GB/s, flops / peak "
        "TFLOP/s) / time; bytes = x, weights and y.", "",
        f"Command: `{document['command']}`", "",
    ]
    return "\n".join(head) + markdown_table(document["rows"], _COLUMNS)
