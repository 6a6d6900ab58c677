"""``bench e2e``: prefill latency, decode throughput and memory of a compressed model vs dense.

Decode follows gpt-fast: a static KV cache (transformers' ``StaticCache``) and one decode step
captured as a CUDA graph, whose replays are timed. The static cache advances its own position
on the device, so each replay decodes the next token, and the cache is sized for exactly the
number of steps run. The step runs the model eagerly (mode ``eager``) or ``torch.compile``d
(mode ``compiled``): the graph removes launch overhead in both, so what compiling gains is the
fusion of the ops around the linears (norms, rotary embedding, attention glue), the share of
the step that compression does not shrink. Models are built one at a time and freed before the
next, so that peak memory belongs to the model being measured.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from lowrank_infer.allocation import RankPlan, uniform_plan
from lowrank_infer.bench.backends import running
from lowrank_infer.bench.operands import relative_error
from lowrank_infer.bench.output import Column, add_speedups, markdown_table
from lowrank_infer.bench.timing import available_memory, capture_graph, fixed_calls_ms, free_memory, median_ms
from lowrank_infer.io import PLAN_FILE, is_compressed_checkpoint, load_compressed
from lowrank_infer.packing import pack_model
from lowrank_infer.report import model_size
from lowrank_infer.structure import target_shapes
from lowrank_infer.surgery import apply_plan, dequantize

__all__ = [
    "MODES",
    "PACKINGS",
    "E2ESettings",
    "Variant",
    "check_packing",
    "checkpoint_variants",
    "compile_decode",
    "decode_step",
    "markdown_report",
    "random_factors",
    "random_model",
    "run_e2e_bench",
    "shape_only_variants",
]

# How the decode step runs: the model's eager forward, or torch.compile's graph of it.
MODES = ("eager", "compiled")
# Compressed models run as loaded, or packed (layers that share an input grouped into one op).
PACKINGS = ("unpacked", "packed")
# Decode steps run on a side stream before a graph is captured.
_DECODE_WARMUP = 3
# Relative error of a compiled step's logits vs the eager step's above which compiling broke the
# model: rounding differs between the two, so the bound is loose; broken graphs give errors near 1.
_COMPILED_TOLERANCE = 0.1


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
    modes: tuple[str, ...] = ("eager",)  # of the decode step (prefill always runs eagerly)
    packings: tuple[str, ...] = ("unpacked",)  # of compressed models, in the order of PACKINGS


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
    # Unpacked as built: the packed rows pack it themselves (--packing).
    load = functools.partial(load_compressed, path, device=str(device), dtype=dtype, pack=False)
    return plan, [Variant(lambda: dequantize(load())), Variant(load, plan)]


def check_packing(packings: list[str]) -> tuple[str, ...]:
    """``packings`` in the order they are measured (unpacked first: packing changes a model in place).

    Raises:
        ValueError: an unknown name.
    """
    unknown = [name for name in packings if name not in PACKINGS]
    if unknown:
        raise ValueError(f"unknown packing {', '.join(map(repr, unknown))} (known: {', '.join(PACKINGS)})")
    return tuple(name for name in PACKINGS if name in packings)


def _pack(model: nn.Module) -> dict | None:
    """Pack ``model`` in place; what it now holds (``lowrank_infer.PackReport``'s fields)."""
    return dataclasses.asdict(pack_model(model))


# ---------------------------------------------------------------- measurements


def run_e2e_bench(
    variants: list[Variant], settings: E2ESettings, on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Rows of prefill and decode measurements: the dense variant with backend ``dense``, each
    compressed one with every other backend (in each of ``settings.packings``), decode in each of
    ``settings.modes``; ``speedup_vs_dense`` where the dense row of the same mode succeeded, and
    ``speedup_vs_eager`` on compiled rows.

    Args:
        variants: the models to measure.
        settings: what to measure, and where.
        on_row: called with the rows so far after each one, e.g. to save them while a long run goes on.
    """
    rows: list[dict] = []
    with torch.inference_mode():
        for variant in variants:
            backends = [name for name in settings.backends if (name == "dense") == (variant.plan is None)]
            for row in _bench_variant(variant, backends, settings) if backends else ():
                rows.append(row)
                if on_row is not None:
                    _add_ratios(rows)
                    on_row(rows)
            free_memory(settings.device)
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    add_speedups(rows, ("mode", "phase", "batch", "tokens"))
    _add_compile_gains(rows)


def _bench_variant(variant: Variant, backends: list[str], settings: E2ESettings) -> Iterator[dict]:
    model = variant.build()
    plan = variant.plan
    labels = (dict(method=plan.method, keep=plan.keep_target, keep_achieved=plan.keep_achieved) if plan
              else dict(method="dense", keep=1.0, keep_achieved=1.0))
    for packing in settings.packings if plan else ("unpacked",):
        report = _pack(model) if packing == "packed" else None
        size = model_size(model)
        base = {**labels, "packed": packing == "packed", "pack_report": report, "model_params": size["params"],
                "model_bytes": size["bytes"], "dtype": str(settings.dtype).removeprefix("torch.")}
        print(f"{labels['method']} keep {labels['keep']} {packing}:", file=sys.stderr, flush=True)
        yield from _measure_model(model, backends, base, settings)


def _measure_model(model: nn.Module, backends: list[str], base: dict, settings: E2ESettings) -> Iterator[dict]:
    """Prefill rows, then decode rows mode by mode and batch by batch, every backend at each.

    Backends are the inner loop: one compiled forward serves them all (the op reads the backend
    when it runs, so switching it recompiles nothing), and a run stopped by a time limit has
    every backend's rows of the cases it finished.
    """
    torch._dynamo.reset()  # a new model starts from an empty compile cache
    compiled = compile_decode(model) if "compiled" in settings.modes else None
    cases = []
    for length in settings.prompt_lens:
        case = dict(phase="prefill", mode="eager", batch=1, tokens=length)
        cases.append((functools.partial(_prefill_ms, model, length, settings), case))
    for mode in settings.modes:
        for batch in settings.batches:
            case = dict(phase="decode", mode=mode, batch=batch, tokens=settings.context)
            forward = compiled if mode == "compiled" else None
            cases.append((functools.partial(_decode_ms, model, batch, settings, forward), case))
    try:
        for measure, case in cases:
            for backend in backends:
                with running(backend):
                    yield {**base, **_measurement(measure, settings.device, backend=backend, **case)}
    finally:
        torch._dynamo.reset()  # compiled code holds on to the model: let it go before the next is built


def _add_compile_gains(rows: list[dict]) -> None:
    """Set ``speedup_vs_eager`` = eager time / compiled time on compiled rows whose eager twin was timed."""
    twin = ("backend", "method", "keep", "keep_achieved", "packed", "phase", "batch", "tokens")
    eager_ms = {tuple(r[key] for key in twin): r["median_ms"] for r in rows if r["mode"] == "eager"}
    for row in rows:
        base = eager_ms.get(tuple(row[key] for key in twin)) if row["mode"] == "compiled" else None
        row["speedup_vs_eager"] = base / row["median_ms"] if base and row["median_ms"] else None


def _measurement(measure: Callable[[], dict], device: torch.device, **row) -> dict:
    """Run ``measure`` (which returns ``median_ms``, ``timer`` and, compiled, ``compiled_rel_err``)
    with fresh peak-memory statistics; a failure becomes a failed row."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row["compiled_rel_err"] = None
    try:
        row.update(measure())
    except Exception as err:  # noqa: BLE001 - e.g. out of memory at batch 32: report, go on
        row.update(median_ms=None, timer=None, tokens_per_s=None, peak_memory_bytes=None,
                   status=f"failed: {type(err).__name__}: {err}"[:200])
    else:
        produced = row["batch"] * (row["tokens"] if row["phase"] == "prefill" else 1)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        row.update(tokens_per_s=produced / row["median_ms"] * 1e3, peak_memory_bytes=peak, status="ok")
    _progress(row)
    return row


def _random_ids(model: nn.Module, batch: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.randint(model.config.vocab_size, (batch, length), device=device)


def _prefill_ms(model: nn.Module, length: int, settings: E2ESettings) -> dict:
    """Median latency of one forward over a ``length``-token prompt (batch 1).

    Only the last position's logits are computed, as in generation.
    """
    ids = _random_ids(model, 1, length, settings.device)
    ms = median_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), settings.device, settings.rep_ms)
    return {"median_ms": ms, "timer": "do_bench" if settings.device.type == "cuda" else "perf_counter"}


def compile_decode(model: nn.Module) -> nn.Module:
    """``model`` under ``torch.compile`` for static-cache decode steps: one whole graph
    (``fullgraph``: a graph break fails loudly instead of timing half a model eagerly), static
    shapes (each batch size compiles once; the graph then serves every backend)."""
    return torch.compile(model, fullgraph=True, dynamic=False)


def decode_step(forward: Callable[..., object], ids: torch.Tensor, cache) -> Callable[[], torch.Tensor]:
    """One decode step as the bench times it: ``forward`` (a model, or :func:`compile_decode` of
    it) on the tokens in ``ids`` (``[batch, 1]``, read at each call) writes the next slot of the
    static ``cache`` and returns the logits ``[batch, 1, vocab]``."""
    return lambda: forward(input_ids=ids, past_key_values=cache, use_cache=True).logits


def _decode_ms(model: nn.Module, batch: int, settings: E2ESettings, compiled: nn.Module | None = None) -> dict:
    """Median latency of one decode step of ``batch`` sequences after ``settings.context`` tokens,
    run by ``compiled`` (first checked against the eager step) or, when None, eagerly."""
    from transformers import StaticCache

    steps, trials = settings.decode_steps, settings.trials
    # Every step run below advances the cache by one slot; a step past its end would fault. The
    # check of a compiled step runs one eager and one compiled step at the same slot.
    checks = 0 if compiled is None else 1
    cache = StaticCache(config=model.config,
                        max_cache_len=settings.context + checks + _DECODE_WARMUP + (trials + 1) * steps)
    model(input_ids=_random_ids(model, batch, settings.context, settings.device), past_key_values=cache,
          use_cache=True, logits_to_keep=1)
    if settings.device.type == "cuda":
        # The decode row's peak memory is the steady state (weights, cache, one step), not the prefill's.
        torch.cuda.reset_peak_memory_stats(settings.device)
    ids = _random_ids(model, batch, 1, settings.device)
    step = decode_step(model if compiled is None else compiled, ids, cache)
    fields = {}
    if compiled is not None:
        fields["compiled_rel_err"] = _compiled_error(decode_step(model, ids, cache), step, cache)
    run, timer = _prepare_step(step, settings.device)
    return {"median_ms": fixed_calls_ms(run, settings.device, steps, trials), "timer": timer, **fields}


def _compiled_error(eager: Callable[[], torch.Tensor], compiled: Callable[[], torch.Tensor], cache) -> float:
    """Relative error of the ``compiled`` step's logits vs the ``eager`` step's at the same cache slot
    (the first compiled call, which compiles).

    Raises:
        ValueError: compiling changed the result beyond rounding (:data:`_COMPILED_TOLERANCE`).
    """
    ref = eager().double()
    rewind_one_slot(cache)  # the compiled step rewrites the slot the eager one wrote
    err = relative_error(compiled(), ref)
    if not err < _COMPILED_TOLERANCE:  # also catches NaN
        raise ValueError(f"the compiled step's logits differ from the eager step's by {err:.3g} (relative)")
    return err


def rewind_one_slot(cache) -> None:
    """Move a static ``cache`` back by one position, so the next step rewrites the last slot.

    transformers before about 5.2x has no ``StaticLayer.crop``; there a layer's position is the
    ``cumulative_length`` tensor alone, decremented in place (its address is static under compile).
    """
    for layer in cache.layers:
        if hasattr(layer, "crop"):
            layer.crop(-1)
        else:
            layer.cumulative_length.sub_(1)


def _prepare_step(step: Callable[[], object], device: torch.device) -> tuple[Callable[[], object], str]:
    """``(what to time, timer name)`` after ``_DECODE_WARMUP`` steps: on a GPU the replay of ``step``
    captured as a CUDA graph, or ``step`` itself if capture fails; on a CPU ``step``.

    The warm-up also keeps a compiled step's first calls, which are slow on both, out of the timing.
    """
    if device.type != "cuda":
        for _ in range(_DECODE_WARMUP):
            step()
        return step, "perf_counter"
    try:
        graph = capture_graph(step, warmup=_DECODE_WARMUP)
    except RuntimeError as err:
        print(f"  CUDA graph capture failed, timing eagerly: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        return step, "cuda_events"
    return graph.replay, "cuda_graph"


def _progress(row: dict) -> None:
    timing = f"{row['median_ms']:.3f} ms" if row["median_ms"] is not None else row["status"]
    print(f"  {row['phase']} {row['mode']} batch {row['batch']} tokens {row['tokens']} {row['backend']}: {timing}",
          file=sys.stderr, flush=True)


_COLUMNS: list[Column] = [
    ("backend", "backend", str), ("method", "method", str), ("keep", "keep", str),
    ("packed", "packed", lambda v: "yes" if v else "no"), ("phase", "phase", str), ("mode", "mode", str),
    ("batch", "batch", str), ("tokens", "tokens", str), ("timer", "timer", str),
    ("ms", "median_ms", lambda v: f"{v:.3f}"), ("tok/s", "tokens_per_s", lambda v: f"{v:.1f}"),
    ("peak MiB", "peak_memory_bytes", lambda v: f"{v / 2**20:.0f}"),
    ("model MiB", "model_bytes", lambda v: f"{v / 2**20:.0f}"),
    ("x dense", "speedup_vs_dense", lambda v: f"{v:.2f}"), ("x eager", "speedup_vs_eager", lambda v: f"{v:.2f}"),
    ("compiled err", "compiled_rel_err", lambda v: f"{v:.1e}"), ("status", "status", str),
]


def markdown_report(document: dict) -> str:
    """The results of a ``bench e2e`` document as a titled markdown table."""
    env = document["environment"]
    source = "random weights, shapes only" if document["shape_only"] else "checkpoint"
    head = [
        f"## lowrank-infer bench e2e: {document['model']} ({source}) on {env['device_label']}, {document['dtype']}",
        "",
        "Prefill: batch 1, tokens = prompt length, eager. Decode: tokens = KV-cache length before the timed "
        "steps; tok/s = batch / step time; mode eager or compiled (torch.compile), both timed the same way "
        "(CUDA-graph replays on a GPU), so x eager is what fusing the non-linear ops gains; x dense compares "
        "with the dense model in the same mode; compiled err = the compiled step's logits vs the eager "
        f"step's (relative). torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']}.", "",
        f"Command: `{document['command']}`", "",
    ]
    if document.get("partial"):
        head += ["Partial: the run stopped before its end (a time limit?); these are the rows it measured.", ""]
    return "\n".join(head) + markdown_table(document["rows"], _COLUMNS)
