"""``lowrank-infer bench kernels``, ``bench block`` and ``bench e2e``, plugged into the main CLI.

The main CLI (:mod:`lowrank_infer.cli`) reports the ValueError, OSError and ImportError that
bad input raises here as one-line errors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lowrank_infer.bench.backends import BACKENDS, CPU_BACKENDS, check_backends

__all__ = ["add_bench_parser", "cmd_block", "cmd_e2e", "cmd_kernels"]

_DTYPES = ("float32", "float16", "bfloat16")
# Copies of lowrank_infer.bench.e2e's MODES and PACKINGS: building the parser imports none of the
# bench modules, which load the model stack (tests check that the copies match).
_E2E_MODES = ("eager", "compiled")
_E2E_PACKINGS = ("unpacked", "packed")

# Defaults by (device type, --quick); a flag given on the command line wins. --quick is a
# one-minute smoke run; on CPU everything is small because CPU timings only check the harness.
KERNEL_DEFAULTS = {
    ("cuda", False): dict(models=["llama2-7b", "llama3-8b", "qwen2.5-7b", "smollm2-135m"], layers=None,
                          keep=[0.4, 0.6, 0.8], tokens=[1, 4, 16, 64, 512, 2048, 8192], rep_ms=50.0,
                          backends=BACKENDS),
    ("cuda", True): dict(models=["llama2-7b"], layers=["q", "down"], keep=[0.6], tokens=[1, 16, 512], rep_ms=25.0,
                         backends=BACKENDS),
    ("cpu", False): dict(models=["smollm2-135m"], layers=None, keep=[0.4, 0.6, 0.8], tokens=[1, 16, 64, 512],
                         rep_ms=50.0, backends=CPU_BACKENDS),
    ("cpu", True): dict(models=["smollm2-135m"], layers=["q", "down"], keep=[0.6], tokens=[1, 16], rep_ms=10.0,
                        backends=CPU_BACKENDS),
}
BLOCK_DEFAULTS = {
    ("cuda", False): dict(model="llama2-7b", keep=0.6, tokens=[1, 16, 32], backends=("dense", "cublas", "triton"),
                          pdl=["off", "on"], rep_ms=25.0),
    ("cuda", True): dict(model="llama2-7b", keep=0.6, tokens=[1, 16], backends=("dense", "cublas", "triton"),
                         pdl=["off", "on"], rep_ms=10.0),
    ("cpu", False): dict(model="smollm2-135m", keep=0.6, tokens=[1, 16, 32], backends=CPU_BACKENDS, pdl=["off"],
                         rep_ms=20.0),
    ("cpu", True): dict(model="smollm2-135m", keep=0.6, tokens=[1, 16], backends=CPU_BACKENDS, pdl=["off"],
                        rep_ms=5.0),
}
E2E_DEFAULTS = {
    ("cuda", False): dict(keep=[0.6], prompt_lens=[128, 2048], batches=[1, 8, 32], context=512, decode_steps=32,
                          trials=5, backends=BACKENDS, rep_ms=300.0),
    ("cuda", True): dict(keep=[0.6], prompt_lens=[128], batches=[1, 8], context=128, decode_steps=16, trials=3,
                         backends=("dense", "cublas", "triton"), rep_ms=100.0),
    ("cpu", False): dict(keep=[0.6], prompt_lens=[32, 128], batches=[1, 4], context=32, decode_steps=4, trials=3,
                         backends=CPU_BACKENDS, rep_ms=200.0),
    ("cpu", True): dict(keep=[0.6], prompt_lens=[8], batches=[1], context=8, decode_steps=2, trials=2,
                        backends=CPU_BACKENDS, rep_ms=20.0),
}


def _add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", nargs="+",
                   help=f"{' '.join(BACKENDS)}: dense is the dense baseline, the others lowrank_linear's "
                   "backends (default: all on CUDA; dense torch on CPU, where the op always runs torch)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=_DTYPES, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run: few, small cases")
    p.add_argument("--multiple-of", type=int, default=1, help="ranks are multiples of this (tensor-core alignment)")
    p.add_argument("--rep-ms", type=float, default=None, help="sampling time per timed case, in ms")
    p.add_argument("--json", metavar="PATH", help="write the results, environment and command as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the printed markdown table to PATH")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with ``kernels`` and ``e2e``) to the ``lowrank-infer`` sub-commands.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned.

    Returns:
        The ``bench`` parser.
    """
    bench = subparsers.add_parser("bench", help="kernel and end-to-end speed benchmarks",
                                  description="Speed benchmarks; results as a markdown table and, with --json, a file.")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = sub.add_parser("kernels", help="time dense vs low-rank layer backends", description=(
        "Time each backend on real models' layer shapes at the uniform rank k = floor(keep·m·n/(m+n)), after "
        "checking it against float64. Reports median ms, GB/s, TFLOP/s and fractions of the roofline "
        "measured in the same run."))
    p.add_argument("--models", nargs="+", help="model shape tables (llama2-7b llama3-8b qwen2.5-7b smollm2-135m)")
    p.add_argument("--layers", nargs="+", help="projections (q k v o gate up down; default all)")
    p.add_argument("--keep", nargs="+", type=float, help="kept fractions, each in (0, 1) (default 0.4 0.6 0.8)")
    p.add_argument("--tokens", nargs="+", type=int, help="rows of x (T) (default 1 4 16 64 512 2048 8192 on CUDA)")
    _add_common_options(p)
    p.set_defaults(run=cmd_kernels)

    p = sub.add_parser("block", help="one decoder block's projections at decode sizes, alone and grouped",
                       description=(
        "Time one decoder block's projections at decode token counts: each alone, q/k/v and gate/up as "
        "separate calls and as one grouped (lowrank_grouped_linear) or gated (lowrank_gated_linear) op, against "
        "dense weights of the same shapes, the Triton backends with programmatic dependent launch off and on. "
        "Ranks are uniform at --keep, multiples of --multiple-of (default 16 here). Reports time, speedups side "
        "by side, and GB/s on the weights' bytes against a device copy measured in the same run."))
    p.add_argument("--model", help="model shape table (llama2-7b llama3-8b qwen2.5-7b smollm2-135m; "
                   "default llama2-7b on CUDA, smollm2-135m on CPU)")
    p.add_argument("--keep", type=float, help="kept fraction, in (0, 1) (default 0.6)")
    p.add_argument("--tokens", nargs="+", type=int, help="rows of x (T) (default 1 16 32)")
    p.add_argument("--pdl", nargs="+", choices=("off", "on"),
                   help="programmatic dependent launch for the Triton backends (default off on, on CUDA)")
    _add_common_options(p)
    p.set_defaults(run=cmd_block, multiple_of=16)

    p = sub.add_parser("e2e", help="prefill and decode speed of a compressed model vs its dense counterpart",
                       description=(
        "Prefill latency, static-cache decode throughput (CUDA-graph replays on a GPU) and peak memory of a "
        "compressed checkpoint, or of random models built from a known config (--shape-only), against the "
        "dense model of the same shapes."))
    p.add_argument("model", nargs="?", help="compressed checkpoint directory (from 'lowrank-infer compress')")
    p.add_argument("--shape-only", action="store_true", help="random weights of --config's shapes, no checkpoint")
    p.add_argument("--config",
                   help="with --shape-only: llama2-7b, llama3-8b, qwen2.5-7b, smollm2-135m, or a config.json")
    p.add_argument("--keep", nargs="+", type=float,
                   help="with --shape-only: kept fractions, uniform plans (default 0.6, or none with --plan)")
    p.add_argument("--plan", nargs="+", metavar="PLAN",
                   help="with --shape-only: rank-plan JSON files (from 'lowrank-infer plan' or a checkpoint's "
                   "rank_plan.json) for --config's model; each is measured with random factors at its ranks")
    p.add_argument("--prompt-lens", nargs="+", type=int, help="prefill prompt lengths (default 128 2048 on CUDA)")
    p.add_argument("--batches", nargs="+", type=int, help="decode batch sizes (default 1 8 32 on CUDA)")
    p.add_argument("--context", type=int, help="tokens in the KV cache before timed decode steps (default 512)")
    p.add_argument("--decode-steps", type=int, help="decode steps per timed trial (default 32)")
    p.add_argument("--trials", type=int, help="timed decode trials; the median is reported (default 5)")
    p.add_argument("--modes", nargs="+", choices=_E2E_MODES, default=["eager"],
                   help="how the decode step runs: the eager model, torch.compile'd, or both; each is timed as "
                   "CUDA-graph replays on a GPU (default eager)")
    p.add_argument("--packing", nargs="+", choices=_E2E_PACKINGS, default=["unpacked"],
                   help="compressed models as built, and/or packed by lowrank_infer.pack_model (q/k/v as one "
                   "grouped op, gate/up as one gated op) (default unpacked)")
    _add_common_options(p)
    p.set_defaults(run=cmd_e2e)
    return bench


# ---------------------------------------------------------------- helpers


def _options(args, defaults: dict) -> dict:
    """``defaults`` overridden by the flags given on the command line."""
    return {name: default if getattr(args, name) is None else getattr(args, name) for name, default in defaults.items()}


def _positive(flag: str, values) -> None:
    if any(v < 1 for v in values):
        raise ValueError(f"{flag} must be positive integers, got {values}")


def _start(args, defaults: dict) -> tuple[torch.device, torch.dtype, dict]:
    """Device, dtype and options of a run, after checking what needs no model."""
    from lowrank_infer.bench.timing import resolve_device

    device = resolve_device(args.device)
    opts = _options(args, defaults[(device.type, args.quick)])
    check_backends(opts["backends"], device)
    if opts["rep_ms"] <= 0:
        raise ValueError(f"--rep-ms must be positive, got {opts['rep_ms']}")
    _positive("--multiple-of", [args.multiple_of])
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path and Path(path).is_dir():  # found now, not after the whole benchmark has run
            raise ValueError(f"{flag} {path} is a directory; give a file path")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32")), opts


def _partial_writer(args, document, markdown_report):
    """``on_row`` for a bench: write ``--json`` and ``--markdown`` of the rows so far, so that a run
    cut short (a time limit, an out-of-memory kill) still leaves the rows it measured."""
    from lowrank_infer.bench.output import write_outputs

    def save(rows: list[dict]) -> None:
        if args.json or args.markdown:
            partial = document(rows, True)
            write_outputs(partial, markdown_report(partial), args.json, args.markdown, echo=False)

    return save


def _document(kind: str, args, device: torch.device, dtype: torch.dtype, **fields) -> dict:
    from lowrank_infer.bench.output import command_line, environment

    return {"benchmark": kind, "command": command_line(),
            "args": {k: v for k, v in vars(args).items() if not callable(v)},
            "environment": environment(device), "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), **fields}


# ---------------------------------------------------------------- commands


def cmd_kernels(args) -> int:
    """Run ``bench kernels``."""
    from lowrank_infer.bench.kernels import KernelSettings, layer_rank, markdown_report, run_kernel_bench
    from lowrank_infer.bench.output import write_outputs
    from lowrank_infer.bench.roofline import measure_peaks
    from lowrank_infer.bench.shapes import LAYERS, layer_shapes

    device, dtype, opts = _start(args, KERNEL_DEFAULTS)
    shapes = layer_shapes(opts["models"], opts["layers"] or list(LAYERS))
    _positive("--tokens", opts["tokens"])
    # A keep outside (0, 1] or a dense layer fails here, before any timing.
    ranks = {s: [(keep, layer_rank(s.m, s.n, keep, args.multiple_of)) for keep in opts["keep"]] for s in shapes}
    settings = KernelSettings(ranks, opts["tokens"], opts["backends"], device, dtype, opts["rep_ms"])
    peaks = measure_peaks(device, dtype, opts["rep_ms"])
    rows = run_kernel_bench(settings, peaks)
    opts["layers"] = [s.layer for s in shapes]
    document = _document("kernels", args, device, dtype, settings=opts, peaks=peaks.to_dict(), rows=rows)
    write_outputs(document, markdown_report(document), args.json, args.markdown)
    return 0


def cmd_block(args) -> int:
    """Run ``bench block``."""
    from lowrank_infer.bench.block import BlockSettings, block_units, impls, markdown_report, run_block_bench
    from lowrank_infer.bench.output import write_outputs
    from lowrank_infer.bench.roofline import measure_peaks

    device, dtype, opts = _start(args, BLOCK_DEFAULTS)
    _positive("--tokens", opts["tokens"])
    # An unknown model, a keep outside (0, 1] or a dense layer fails here, before any timing.
    units = block_units(opts["model"], opts["keep"], args.multiple_of)
    pairs = impls(list(opts["backends"]), [flag == "on" for flag in dict.fromkeys(opts["pdl"])])
    settings = BlockSettings(opts["model"], opts["keep"], units, opts["tokens"], pairs, device, dtype, opts["rep_ms"])
    peaks = measure_peaks(device, dtype, opts["rep_ms"])

    def document(rows: list[dict], partial: bool) -> dict:
        return _document("block", args, device, dtype, settings=opts, peaks=peaks.to_dict(), partial=partial,
                         rows=rows)

    final = document(run_block_bench(settings, peaks, on_row=_partial_writer(args, document, markdown_report)), False)
    write_outputs(final, markdown_report(final), args.json, args.markdown)
    return 0


def _e2e_variants(args, opts: dict, device: torch.device, dtype: torch.dtype):
    """``(model label, variants)`` from a checkpoint or from --shape-only --config."""
    from lowrank_infer.bench.e2e import checkpoint_variants

    if args.model and args.shape_only:
        raise ValueError("give a compressed model directory or --shape-only, not both")
    if args.shape_only:
        return args.config, _shape_only_variants(args, opts, device, dtype)
    if not args.model:
        raise ValueError(f"give a compressed model directory, or --shape-only --config NAME ({_known_configs()})")
    if args.config or args.keep or args.plan:
        raise ValueError("--config, --keep and --plan apply to --shape-only "
                         "(a checkpoint carries its own rank plan)")
    plan, variants = checkpoint_variants(args.model, device, dtype)
    return plan.model or args.model, variants


def _known_configs() -> str:
    from lowrank_infer.bench.shapes import MODELS

    return ", ".join(MODELS)


def _shape_only_variants(args, opts: dict, device: torch.device, dtype: torch.dtype):
    """Dense, uniform ``--keep`` and ``--plan`` variants of ``--config``'s shapes; without ``--keep``,
    the default keep is measured only when no plan is given."""
    from lowrank_infer.allocation import RankPlan, check_keep
    from lowrank_infer.bench.e2e import shape_only_variants
    from lowrank_infer.bench.shapes import hf_config

    if not args.config:
        raise ValueError(f"--shape-only needs --config: one of {_known_configs()}, or a config.json")
    plans = [RankPlan.load(path) for path in args.plan or []]
    keeps = [check_keep(keep) for keep in args.keep or ([] if plans else opts["keep"])]
    return shape_only_variants(hf_config(args.config), args.config, keeps, device, dtype, args.multiple_of, plans)


def cmd_e2e(args) -> int:
    """Run ``bench e2e``."""
    from lowrank_infer.bench.e2e import E2ESettings, check_packing, markdown_report, run_e2e_bench
    from lowrank_infer.bench.output import write_outputs

    device, dtype, opts = _start(args, E2E_DEFAULTS)
    for flag, values in (("--prompt-lens", opts["prompt_lens"]), ("--batches", opts["batches"]),
                         ("--context", [opts["context"]]), ("--decode-steps", [opts["decode_steps"]]),
                         ("--trials", [opts["trials"]])):
        _positive(flag, values)
    packings = check_packing(args.packing)
    label, variants = _e2e_variants(args, opts, device, dtype)
    opts["keep"] = [variant.plan.keep_target for variant in variants if variant.plan]
    opts.update(plan=args.plan or [], modes=[mode for mode in _E2E_MODES if mode in args.modes], packing=list(packings))
    settings = E2ESettings(opts["prompt_lens"], opts["batches"], opts["context"], opts["decode_steps"], opts["trials"],
                           opts["backends"], device, dtype, opts["rep_ms"], tuple(opts["modes"]), packings)

    def document(rows: list[dict], partial: bool) -> dict:
        return _document("e2e", args, device, dtype, model=label, shape_only=args.shape_only, settings=opts,
                         partial=partial, rows=rows)

    final = document(run_e2e_bench(variants, settings, on_row=_partial_writer(args, document, markdown_report)), False)
    write_outputs(final, markdown_report(final), args.json, args.markdown)
    return 0
