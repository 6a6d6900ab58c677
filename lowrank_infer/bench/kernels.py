"""``bench kernels``: every provider on every layer shape, rank and token count, checked then timed."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

from lowrank_infer.bench.output import Column, markdown_table
from lowrank_infer.bench.providers import Provider, check_provider, make_operands, reference
from lowrank_infer.bench.roofline import Peaks, layer_cost, throughput
from lowrank_infer.bench.shapes import LayerShape, rank_for_keep
from lowrank_infer.bench.timing import cuda_graph_ms, free_memory, median_ms

__all__ = ["GRAPH_MAX_TOKENS", "KernelSettings", "markdown_report", "run_kernel_bench"]

# Decode-sized calls (up to this many tokens) are timed as CUDA-graph replays: eagerly their
# CPU launch overhead would be measured instead of the GPU.
GRAPH_MAX_TOKENS = 16
# A graph cycles through copies of x and the weights adding up to this many bytes, 5x the
# H100's 50 MB L2, so that each call reads its weights from HBM as in a real model.
_ROTATION_BYTES = 256 * 2**20
_MAX_COPIES = 2048
# Enough calls per graph that one replay is long next to the timer's resolution.
_MIN_GRAPH_CALLS = 32


@dataclass(frozen=True)
class KernelSettings:
    """What to time: shapes × keeps × token counts × providers, on one device and dtype."""

    shapes: list[LayerShape]
    keeps: list[float]
    tokens: list[int]
    providers: list[Provider]
    device: torch.device
    dtype: torch.dtype
    rep_ms: float
    multiple_of: int = 1


def run_kernel_bench(settings: KernelSettings, peaks: Peaks) -> list[dict]:
    """One result row per (shape, tokens, provider[, keep]); dense rows are independent of keep.

    Args:
        settings: the grid to time.
        peaks: this run's measured peaks, for roofline fractions.
    """
    dense = [p for p in settings.providers if p.dense]
    lowrank = [p for p in settings.providers if not p.dense]
    rows: list[dict] = []
    for shape in settings.shapes:
        ranks = [(keep, rank_for_keep(shape.m, shape.n, keep, settings.multiple_of)) for keep in settings.keeps] if lowrank else []
        for tokens in settings.tokens:
            if dense:
                rows += _bench_group(dense, shape, None, None, tokens, settings, peaks)
            for keep, k in ranks:
                rows += _bench_group(lowrank, shape, keep, k, tokens, settings, peaks)
    _add_speedups(rows)
    return rows


def _copies(shape: LayerShape, k: int | None, tokens: int, settings: KernelSettings) -> int:
    """How many operand copies a graph-timed case cycles through (1 when timed eagerly)."""
    if settings.device.type != "cuda" or tokens > GRAPH_MAX_TOKENS:
        return 1
    nbytes, _ = layer_cost(shape.m, shape.n, k, tokens, settings.dtype.itemsize)
    return min(_MAX_COPIES, -(-_ROTATION_BYTES // nbytes))


def _bench_group(
    providers: list[Provider], shape: LayerShape, keep: float | None, k: int | None, tokens: int,
    settings: KernelSettings, peaks: Peaks,
) -> list[dict]:
    """Rows of ``providers`` that share one case's operands and float64 reference."""
    base = {"model": shape.model, "layer": shape.layer, "m": shape.m, "n": shape.n, "k": k, "keep": keep,
            "tokens": tokens, "dtype": str(settings.dtype).removeprefix("torch.")}
    try:
        sets = [make_operands(shape.m, shape.n, k, tokens, settings.dtype, settings.device)
                for _ in range(_copies(shape, k, tokens, settings))]
        ref = reference(sets[0])
    except torch.cuda.OutOfMemoryError as err:
        return [_failed({**base, "provider": p.name}, f"inputs: {err}") for p in providers]
    rows = [_bench_provider(p, sets, ref, {**base, "provider": p.name}, settings, peaks) for p in providers]
    del sets, ref
    free_memory(settings.device)
    return rows


def _bench_provider(
    provider: Provider, sets: list[tuple], ref: torch.Tensor, row: dict, settings: KernelSettings, peaks: Peaks,
) -> dict:
    if provider.prepare is not None:
        sets = [provider.prepare(ops) for ops in sets]
    failure = check_provider(provider, sets[0], ref)
    if failure is None:
        try:
            row["median_ms"], row["timer"] = _time(provider, sets, row["tokens"], settings)
        except Exception as err:  # noqa: BLE001 - a failed timing fails this row, not the run
            failure = f"timing: {type(err).__name__}: {err}"[:200]
    if failure is not None:
        row = _failed(row, failure)
    else:
        nbytes, flops = layer_cost(row["m"], row["n"], row["k"], row["tokens"], settings.dtype.itemsize)
        row.update(throughput(row["median_ms"], nbytes, flops, peaks), status="ok")
    _progress(row)
    return row


def _time(provider: Provider, sets: list[tuple], tokens: int, settings: KernelSettings) -> tuple[float, str]:
    """``(median ms, timer name)`` of one call of ``provider``."""
    if settings.device.type == "cpu":
        return median_ms(functools.partial(provider.fn, *sets[0]), settings.device, settings.rep_ms), "perf_counter"
    if tokens > GRAPH_MAX_TOKENS:
        return median_ms(functools.partial(provider.fn, *sets[0]), settings.device, settings.rep_ms), "do_bench"
    calls = [functools.partial(provider.fn, *ops) for ops in sets]
    calls *= -(-_MIN_GRAPH_CALLS // len(calls))
    try:
        return cuda_graph_ms(calls, settings.device, settings.rep_ms), "cuda_graph"
    except RuntimeError as err:
        # Still a number, but the timer column shows that launch overhead is in it.
        print(f"  {provider.name}: CUDA graph capture failed, timing eagerly: {str(err).splitlines()[0]}",
              file=sys.stderr, flush=True)
        return median_ms(calls[0], settings.device, settings.rep_ms), "do_bench"


def _failed(row: dict, reason: str) -> dict:
    return {**row, "median_ms": None, "timer": None, "gbs": None, "tflops": None, "mem_frac": None,
            "compute_frac": None, "roofline_frac": None, "status": f"failed: {reason}"}


def _add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_dense`` = dense time / row time, for rows whose dense case was timed."""
    dense_ms = {(r["model"], r["layer"], r["tokens"]): r["median_ms"] for r in rows if r["k"] is None}
    for row in rows:
        base = dense_ms.get((row["model"], row["layer"], row["tokens"]))
        row["speedup_vs_dense"] = base / row["median_ms"] if base and row["median_ms"] else None


def _progress(row: dict) -> None:
    keep = "dense" if row["keep"] is None else f"keep {row['keep']}"
    timing = f"{row['median_ms']:.4f} ms" if row["median_ms"] is not None else row["status"]
    print(f"  {row['model']} {row['layer']} {row['m']}x{row['n']} {keep} T={row['tokens']} "
          f"{row['provider']}: {timing}", file=sys.stderr, flush=True)


_COLUMNS: list[Column] = [
    ("model", "model", str), ("layer", "layer", str), ("m", "m", str), ("n", "n", str), ("k", "k", str),
    ("keep", "keep", str), ("T", "tokens", str), ("provider", "provider", str), ("timer", "timer", str),
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
