"""``bench e2e``: prefill latency, decode throughput and memory of a compressed model vs dense.

Decode follows gpt-fast: a static KV cache (transformers' ``StaticCache``) and one decode step
captured as a CUDA graph, whose replays are timed. The static cache advances its own position
on the device, so each replay decodes the next token, and the cache is sized for exactly the
number of steps run. Models are built one at a time and freed before the next, so that peak
memory belongs to the model being measured.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from lowrank_infer.allocation import RankPlan, plan_from_ranks
from lowrank_infer.bench.output import Column, markdown_table
from lowrank_infer.bench.shapes import rank_for_keep
from lowrank_infer.bench.timing import available_memory, capture_graph, fixed_calls_ms, free_memory, median_ms
from lowrank_infer.kernels import torch_lowrank_linear, triton_lowrank_linear, two_matmul_linear
from lowrank_infer.module import LowRankLinear
from lowrank_infer.report import model_size
from lowrank_infer.surgery import replace_module, target_shapes

__all__ = [
    "LOWRANK_PATHS",
    "E2ESettings",
    "Variant",
    "check_paths",
    "checkpoint_variants",
    "densify",
    "lowrank_path",
    "markdown_report",
    "random_compress",
    "random_model",
    "run_e2e_bench",
    "shape_only_variants",
    "uniform_random_plan",
]

# How a LowRankLinear computes U·(Vᵀx) in a run. "two_matmul" is also what the library runs
# on CUDA by default (the "cublas" backend); results files made before the backends were
# split call the Triton path "fused".
LOWRANK_PATHS = {
    "triton": triton_lowrank_linear,  # the Triton kernels, fp32 intermediate (CUDA)
    "torch_lowrank": torch_lowrank_linear,  # two matmuls, fp32 intermediate
    "two_matmul": two_matmul_linear,  # two matmuls in the model dtype (cuBLAS on CUDA)
}
# Decode steps run on a side stream before a graph is captured.
_DECODE_WARMUP = 3


@contextlib.contextmanager
def lowrank_path(name: str) -> Iterator[None]:
    """Inside the block, every ``LowRankLinear`` computes through ``LOWRANK_PATHS[name]``.

    ``LowRankLinear.forward`` looks up ``lowrank_infer.module.lowrank_linear`` at call time, so
    rebinding that name switches every layer of every model at once, with no model rebuilt.
    """
    from lowrank_infer import module

    saved = module.lowrank_linear
    module.lowrank_linear = LOWRANK_PATHS[name]
    try:
        yield
    finally:
        module.lowrank_linear = saved


def check_paths(names: list[str]) -> list[str]:
    """``names`` if each is a key of :data:`LOWRANK_PATHS`.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    unknown = [name for name in names if name not in LOWRANK_PATHS]
    if unknown:
        raise ValueError(f"unknown path {', '.join(map(repr, unknown))} (known: {', '.join(LOWRANK_PATHS)})")
    return names


@dataclass(frozen=True)
class Variant:
    """A model to measure: ``keep`` 1.0 is the dense baseline; ``build`` makes it on demand;
    ``method`` names the allocation that chose its ranks."""

    keep: float
    build: Callable[[], nn.Module]
    method: str = "dense"


@dataclass(frozen=True)
class E2ESettings:
    """What to measure, and where."""

    prompt_lens: list[int]
    batches: list[int]
    context: int  # tokens in the KV cache before the timed decode steps
    decode_steps: int  # steps per timed trial
    trials: int
    paths: list[str]
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


def uniform_random_plan(model: nn.Module, keep: float, name: str = "", multiple_of: int = 1) -> RankPlan:
    """The uniform plan of ``keep`` for ``model``'s target linears, with the kernel bench's ranks
    (rounded down to a multiple of ``multiple_of``: the achieved keep is reported)."""
    shapes = target_shapes(model)
    ranks = {layer: rank_for_keep(m, n, keep, multiple_of) for layer, (m, n) in shapes.items()}
    params = {"multiple_of": multiple_of} if multiple_of > 1 else {}
    return plan_from_ranks(shapes, ranks, keep=keep, method="uniform", model=name, params=params)


def random_compress(model: nn.Module, plan: RankPlan) -> nn.Module:
    """Swap the target linears that ``plan`` makes low-rank for ``LowRankLinear`` with random factors.

    The factors are scaled so that ``U @ V.T`` has the replaced weight's entry scale, which keeps
    activations as tame as in the dense model; no SVD is computed. Timing does not depend on the
    weights' values, so this measures the speed of a real plan without its checkpoint.

    Raises:
        PlanError: the plan does not fit the model (naming the first mismatching layer).
    """
    from lowrank_infer.io import attach_plan

    plan.validate(target_shapes(model))
    for layer in plan.layers:
        if layer.rank is not None:
            replace_module(model, layer.name, _random_lowrank(model.get_submodule(layer.name), layer.rank))
    attach_plan(model, plan)
    return model


def _random_lowrank(linear: nn.Linear, rank: int) -> LowRankLinear:
    weight = linear.weight
    new = LowRankLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                        device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        # An entry of U @ V.T sums k products of N(0, s²) pairs: variance k·s⁴ = var(W).
        scale = (weight.float().var().item() / rank) ** 0.25
        new.U.normal_(0.0, scale)
        new.V.normal_(0.0, scale)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def densify(model: nn.Module) -> nn.Module:
    """Replace every low-rank ``LowRankLinear`` by an ``nn.Linear`` holding ``U @ V.T``, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear) and not module.is_dense:
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.U.device, dtype=module.U.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.dense_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            replace_module(model, name, linear)
    return model


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
    """The dense model of ``config``, one random compressed model per uniform keep below 1, and
    one per rank plan in ``plans``."""
    skeleton = random_model(config, torch.device("meta"), dtype)
    _check_fits(skeleton, name, device, dtype)
    for plan in plans:  # fail before any timing, not when the plan's turn comes
        plan.validate(target_shapes(skeleton))

    def build(plan_for: Callable[[nn.Module], RankPlan] | None) -> nn.Module:
        model = random_model(config, device, dtype)
        return model if plan_for is None else random_compress(model, plan_for(model))

    def uniform(keep: float) -> Callable[[nn.Module], RankPlan]:
        return lambda model: uniform_random_plan(model, keep, name, multiple_of)

    variants = [Variant(1.0, functools.partial(build, None))]
    variants += [Variant(keep, functools.partial(build, uniform(keep)), "uniform") for keep in keeps if keep < 1.0]
    variants += [Variant(plan.keep_target, functools.partial(build, lambda _model, p=plan: p), plan.method)
                 for plan in plans]
    return variants


def checkpoint_variants(path: str, device: torch.device, dtype: torch.dtype | None) -> tuple[RankPlan, list[Variant]]:
    """The rank plan of a compressed checkpoint, its dense counterpart (``U @ V.T``) and itself.

    Raises:
        ValueError: ``path`` is not a compressed checkpoint directory, or it has no low-rank layer.
    """
    from lowrank_infer.io import PLAN_FILE, is_compressed_checkpoint, load_compressed

    if not is_compressed_checkpoint(path):
        raise ValueError(f"{path} is not a lowrank_infer compressed model directory "
                         "(make one with 'lowrank-infer compress')")
    plan = RankPlan.load(Path(path) / PLAN_FILE)
    if all(layer.rank is None for layer in plan.layers):
        raise ValueError(f"{path} keeps every layer dense: there is no low-rank model to compare with dense")
    load = functools.partial(load_compressed, path, device=str(device), dtype=dtype)
    return plan, [Variant(1.0, lambda: densify(load())), Variant(plan.keep_target, load, plan.method)]


# ---------------------------------------------------------------- measurements


def run_e2e_bench(variants: list[Variant], settings: E2ESettings) -> list[dict]:
    """Rows of prefill and decode measurements of every variant, and of every path of each
    compressed one, with ``speedup_vs_dense`` where the dense row succeeded.
    """
    rows: list[dict] = []
    with torch.inference_mode():
        for variant in variants:
            rows += _bench_variant(variant, settings)
            free_memory(settings.device)
    _add_speedups(rows)
    return rows


def _bench_variant(variant: Variant, settings: E2ESettings) -> list[dict]:
    from lowrank_infer.io import model_plan

    model = variant.build()
    size = model_size(model)
    dense = variant.keep >= 1.0
    base = {"method": variant.method, "keep": variant.keep,
            "keep_achieved": 1.0 if dense else model_plan(model).keep_achieved,
            "model_params": size["params"], "model_bytes": size["bytes"],
            "dtype": str(settings.dtype).removeprefix("torch.")}
    if dense:
        return _measure_path(model, "dense", base, settings)
    rows = []
    for path in settings.paths:
        with lowrank_path(path):
            rows += _measure_path(model, path, base, settings)
    return rows


def _measure_path(model: nn.Module, path: str, base: dict, settings: E2ESettings) -> list[dict]:
    kernel = _kernel_name(path, settings.device)
    print(f"keep {base['keep']} path {path} ({kernel}):", file=sys.stderr, flush=True)
    rows = [_measurement(functools.partial(_prefill_ms, model, length, settings), settings.device,
                         phase="prefill", batch=1, tokens=length) for length in settings.prompt_lens]
    rows += [_measurement(functools.partial(_decode_ms, model, batch, settings), settings.device,
                          phase="decode", batch=batch, tokens=settings.context) for batch in settings.batches]
    return [{"path": path, "kernel": kernel, **base, **row} for row in rows]


def _kernel_name(path: str, device: torch.device) -> str:
    """What a path runs on ``device`` (two_matmul is cuBLAS on CUDA)."""
    return "cublas" if path == "two_matmul" and device.type == "cuda" else path


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


def _add_speedups(rows: list[dict]) -> None:
    dense_ms = {(r["phase"], r["batch"], r["tokens"]): r["median_ms"] for r in rows if r["path"] == "dense"}
    for row in rows:
        base = dense_ms.get((row["phase"], row["batch"], row["tokens"]))
        row["speedup_vs_dense"] = base / row["median_ms"] if base and row["median_ms"] else None


def _progress(row: dict) -> None:
    timing = f"{row['median_ms']:.3f} ms" if row["median_ms"] is not None else row["status"]
    print(f"  {row['phase']} batch {row['batch']} tokens {row['tokens']}: {timing}", file=sys.stderr, flush=True)


_COLUMNS: list[Column] = [
    ("path", "path", str), ("kernel", "kernel", str), ("method", "method", str), ("keep", "keep", str),
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
