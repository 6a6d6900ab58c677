"""``bench e2e``: prefill latency, decode throughput and memory of a compressed model vs dense.

Decode follows gpt-fast: a static KV cache (transformers' ``StaticCache``) and one decode step
captured as a CUDA graph, whose replays are timed. The static cache advances its own position
on the device, so each replay decodes the next token, and the cache is sized for exactly the
number of steps run. Models are built one at a time and freed before the next, so that peak
memory belongs to the model being measured.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowrank_infer.allocation import RankPlan, uniform_plan
from lowrank_infer.bench.backends import running
from lowrank_infer.bench.output import Column, add_speedups, markdown_table
from lowrank_infer.bench.timing import available_memory, capture_graph, fixed_calls_ms, free_memory, median_ms
from lowrank_infer.io import PLAN_FILE, is_compressed_checkpoint, load_compressed
from lowrank_infer.report import model_size
from lowrank_infer.structure import target_shapes
from lowrank_infer.surgery import apply_plan, dequantize

__all__ = [
    "E2ESettings",
    "Variant",
    "checkpoint_variants",
    "markdown_report",
    "random_factors",
    "random_model",
    "run_e2e_bench",
    "shape_only_variants",
]

# Decode steps run on a side stream before a graph is captured.
_DECODE_WARMUP = 3


@dataclass(frozen=True)
class Variant:
    """A model to measure: ``build`` makes it on demand; ``plan`` is None for the dense baseline."""

    build: Callable[[], nn.Module]
    plan: RankPlan | None = None


@dataclass(frozen=True)
class E2ESettings:
    """What to measure, and where."""

    prompt_lens: list[int]
    batches: list[int]
    context: int  # tokens in the KV cache before the timed decode steps
    decode_steps: int  # steps per timed trial
    trials: int
    backends: list[str]  # "dense" measures the dense variant, the others each compressed one
    device: torch.device
    dtype: torch.dtype
    rep_ms: float


# ---------------------------------------------------------------- models


def random_model(config, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A causal LM of ``config`` with transformers' random initialisation, built on ``device``."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_factors(model: nn.Module) -> Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """``factors`` for :func:`~lowrank_infer.surgery.apply_plan`: random ``U``, ``V`` of a layer of ``model``.

    Scaled so that ``U @ V.T`` has the replaced weight's entry scale, which keeps activations as
    tame as in the dense model; no SVD is computed. Timing does not depend on the weights'
    values, so this measures the speed of a real plan without its checkpoint.
    """

    def factors(name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = model.get_submodule(name).weight
        # An entry of U @ V.T sums k products of N(0, s²) pairs: variance k·s⁴ = var(W).
        scale = (weight.float().var().item() / rank) ** 0.25
        U, V = (torch.randn(rows, rank, device=weight.device, dtype=weight.dtype) * scale for rows in weight.shape)
        return U, V

    return factors


def _random_compressed(config, plan: RankPlan, device: torch.device, dtype: torch.dtype) -> nn.Module:
    model = random_model(config, device, dtype)
    return apply_plan(model, plan, random_factors(model))


def _check_fits(skeleton: nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a dense model larger than the memory free on ``device`` (it is built first):
    a clear error now instead of an out-of-memory kill minutes later."""
    need = sum(p.numel() for p in skeleton.parameters()) * dtype.itemsize
    free = available_memory(device)
    if free is not None and need > free:
        raise ValueError(f"{name} in {str(dtype).removeprefix('torch.')} needs {need / 2**30:.1f} GiB for its "
                         f"weights alone, more than the {free / 2**30:.1f} GiB free on {device}; "
                         "use a GPU, a 16-bit --dtype or a smaller --config")


def shape_only_variants(
    config, name: str, keeps: list[float], device: torch.device, dtype: torch.dtype, multiple_of: int = 1,
    plans: list[RankPlan] = (),
) -> list[Variant]:
    """The dense model of ``config``, then random compressed models: one per uniform keep below 1
    (:func:`~lowrank_infer.allocation.uniform_plan`) and one per rank plan in ``plans``.

    Raises:
        ValueError: the dense model does not fit on ``device``, a uniform plan cannot be made, or
            a plan does not fit the model (all found before anything is built).
    """
    skeleton = random_model(config, torch.device("meta"), dtype)
    _check_fits(skeleton, name, device, dtype)
    shapes = target_shapes(skeleton)
    uniform = [uniform_plan(shapes, keep, model=name, multiple_of=multiple_of) for keep in keeps if keep < 1.0]
    for plan in plans:
        plan.validate(shapes)
    compressed = [Variant(functools.partial(_random_compressed, config, plan, device, dtype), plan)
                  for plan in uniform + list(plans)]
    return [Variant(functools.partial(random_model, config, device, dtype)), *compressed]


def checkpoint_variants(path: str, device: torch.device, dtype: torch.dtype | None) -> tuple[RankPlan, list[Variant]]:
    """The rank plan of a compressed checkpoint, its dense counterpart (``U @ V.T``) and itself.

    Raises:
        ValueError: ``path`` is not a compressed checkpoint directory, or it has no low-rank layer.
    """
    if not is_compressed_checkpoint(path):
        raise ValueError(f"{path} is not a lowrank_infer compressed model directory "
                         "(make one with 'lowrank-infer compress')")
    plan = RankPlan.load(Path(path) / PLAN_FILE)
    if all(layer.rank is None for layer in plan.layers):
        raise ValueError(f"{path} keeps every layer dense: there is no low-rank model to compare with dense")
    load = functools.partial(load_compressed, path, device=str(device), dtype=dtype)
    return plan, [Variant(lambda: dequantize(load())), Variant(load, plan)]


# ---------------------------------------------------------------- measurements


def run_e2e_bench(variants: list[Variant], settings: E2ESettings) -> list[dict]:
    """Rows of prefill and decode measurements: the dense variant with backend ``dense``, each
    compressed one with every other backend, and ``speedup_vs_dense`` where the dense row succeeded.
    """
    rows: list[dict] = []
    with torch.inference_mode():
        for variant in variants:
            backends = [name for name in settings.backends if (name == "dense") == (variant.plan is None)]
            if backends:
                rows += _bench_variant(variant, backends, settings)
                free_memory(settings.device)
    add_speedups(rows, ("phase", "batch", "tokens"))
    return rows


def _bench_variant(variant: Variant, backends: list[str], settings: E2ESettings) -> list[dict]:
    model = variant.build()
    size = model_size(model)
    plan = variant.plan
    labels = (dict(method=plan.method, keep=plan.keep_target, keep_achieved=plan.keep_achieved) if plan
              else dict(method="dense", keep=1.0, keep_achieved=1.0))
    base = {**labels, "model_params": size["params"], "model_bytes": size["bytes"],
            "dtype": str(settings.dtype).removeprefix("torch.")}
    rows = []
    for backend in backends:
        with running(backend):
            rows += _measure_backend(model, {"backend": backend, **base}, settings)
    return rows


def _measure_backend(model: nn.Module, base: dict, settings: E2ESettings) -> list[dict]:
    print(f"{base['method']} keep {base['keep']} backend {base['backend']}:", file=sys.stderr, flush=True)
    rows = [_measurement(functools.partial(_prefill_ms, model, length, settings), settings.device,
                         phase="prefill", batch=1, tokens=length) for length in settings.prompt_lens]
    rows += [_measurement(functools.partial(_decode_ms, model, batch, settings), settings.device,
                          phase="decode", batch=batch, tokens=settings.context) for batch in settings.batches]
    return [{**base, **row} for row in rows]


def _measurement(measure: Callable[[], tuple[float, str]], device: torch.device, **row) -> dict:
    """Run ``measure`` with fresh peak-memory statistics; a failure becomes a failed row."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        ms, timer = measure()
    except Exception as err:  # noqa: BLE001 - e.g. out of memory at batch 32: report, go on
        row.update(median_ms=None, timer=None, tokens_per_s=None, peak_memory_bytes=None,
                   status=f"failed: {type(err).__name__}: {err}"[:200])
    else:
        produced = row["batch"] * (row["tokens"] if row["phase"] == "prefill" else 1)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        row.update(median_ms=ms, timer=timer, tokens_per_s=produced / ms * 1e3, peak_memory_bytes=peak, status="ok")
    _progress(row)
    return row


def _random_ids(model: nn.Module, batch: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.randint(model.config.vocab_size, (batch, length), device=device)


def _prefill_ms(model: nn.Module, length: int, settings: E2ESettings) -> tuple[float, str]:
    """Median latency of one forward over a ``length``-token prompt (batch 1).

    Only the last position's logits are computed, as in generation.
    """
    ids = _random_ids(model, 1, length, settings.device)
    ms = median_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), settings.device, settings.rep_ms)
    return ms, "do_bench" if settings.device.type == "cuda" else "perf_counter"


def _decode_ms(model: nn.Module, batch: int, settings: E2ESettings) -> tuple[float, str]:
    """Median latency of one decode step of ``batch`` sequences after ``settings.context`` tokens."""
    from transformers import StaticCache

    steps, trials = settings.decode_steps, settings.trials
    # Every step run below advances the cache by one slot; a step past its end would fault.
    cache = StaticCache(config=model.config, max_cache_len=settings.context + _DECODE_WARMUP + (trials + 1) * steps)
    model(input_ids=_random_ids(model, batch, settings.context, settings.device), past_key_values=cache,
          use_cache=True, logits_to_keep=1)
    if settings.device.type == "cuda":
        # The decode row's peak memory is the steady state (weights, cache, one step), not the prefill's.
        torch.cuda.reset_peak_memory_stats(settings.device)
    ids = _random_ids(model, batch, 1, settings.device)

    def step() -> None:
        model(input_ids=ids, past_key_values=cache, use_cache=True)

    run, timer = _prepare_step(step, settings.device)
    return fixed_calls_ms(run, settings.device, steps, trials), timer


def _prepare_step(step: Callable[[], None], device: torch.device) -> tuple[Callable[[], None], str]:
    """``(what to time, timer name)``: on a GPU the replay of ``step`` captured as a CUDA graph
    (after ``_DECODE_WARMUP`` eager steps), or ``step`` itself if capture fails; on a CPU ``step``."""
    if device.type != "cuda":
        return step, "perf_counter"
    try:
        graph = capture_graph(step, warmup=_DECODE_WARMUP)
    except RuntimeError as err:
        print(f"  CUDA graph capture failed, timing eagerly: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        return step, "cuda_events"
    return graph.replay, "cuda_graph"


def _progress(row: dict) -> None:
    timing = f"{row['median_ms']:.3f} ms" if row["median_ms"] is not None else row["status"]
    print(f"  {row['phase']} batch {row['batch']} tokens {row['tokens']}: {timing}", file=sys.stderr, flush=True)


_COLUMNS: list[Column] = [
    ("backend", "backend", str), ("method", "method", str), ("keep", "keep", str),
    ("phase", "phase", str), ("batch", "batch", str), ("tokens", "tokens", str), ("timer", "timer", str),
    ("ms", "median_ms", lambda v: f"{v:.3f}"), ("tok/s", "tokens_per_s", lambda v: f"{v:.1f}"),
    ("peak MiB", "peak_memory_bytes", lambda v: f"{v / 2**20:.0f}"),
    ("model MiB", "model_bytes", lambda v: f"{v / 2**20:.0f}"),
    ("x dense", "speedup_vs_dense", lambda v: f"{v:.2f}"), ("status", "status", str),
]


def markdown_report(document: dict) -> str:
    """The results of a ``bench e2e`` document as a titled markdown table."""
    env = document["environment"]
    source = "random weights, shapes only" if document["shape_only"] else "checkpoint"
    head = [
        f"## lowrank-infer bench e2e: {document['model']} ({source}) on {env['device_label']}, {document['dtype']}",
        "",
        "Prefill: batch 1, tokens = prompt length. Decode: tokens = KV-cache length before the timed steps; "
        f"tok/s = batch / step time. torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']}.", "",
        f"Command: `{document['command']}`", "",
    ]
    return "\n".join(head) + markdown_table(document["rows"], _COLUMNS)
