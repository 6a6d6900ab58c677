"""``lowrank-infer bench kernels`` and ``lowrank-infer bench e2e``.

``add_bench_parser`` plugs both into the main ``lowrank-infer`` parser; ``main`` runs them on
their own (``python -m lowrank_infer.bench kernels --quick``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

__all__ = ["add_bench_parser", "cmd_e2e", "cmd_kernels", "main"]

_DTYPES = ("float32", "float16", "bfloat16")

# Defaults by (device type, --quick); a flag given on the command line wins. --quick is a
# one-minute smoke run; on CPU everything is small because CPU timings only check the harness.
KERNEL_DEFAULTS = {
    ("cuda", False): dict(models=["llama2-7b", "llama3-8b", "qwen2.5-7b", "smollm2-135m"], layers=None,
                          keep=[0.4, 0.6, 0.8], tokens=[1, 4, 16, 64, 512, 2048, 8192], rep_ms=50.0),
    ("cuda", True): dict(models=["llama2-7b"], layers=["q", "down"], keep=[0.6], tokens=[1, 16, 512], rep_ms=25.0),
    ("cpu", False): dict(models=["smollm2-135m"], layers=None, keep=[0.4, 0.6, 0.8], tokens=[1, 16, 64, 512],
                         rep_ms=50.0),
    ("cpu", True): dict(models=["smollm2-135m"], layers=["q", "down"], keep=[0.6], tokens=[1, 16], rep_ms=10.0),
}
E2E_DEFAULTS = {
    ("cuda", False): dict(keep=[0.6], prompt_lens=[128, 2048], batches=[1, 8, 32], context=512, decode_steps=32,
                          trials=5, paths=["triton", "two_matmul", "torch_lowrank"], rep_ms=300.0),
    ("cuda", True): dict(keep=[0.6], prompt_lens=[128], batches=[1, 8], context=128, decode_steps=16, trials=3,
                         paths=["triton", "two_matmul"], rep_ms=100.0),
    ("cpu", False): dict(keep=[0.6], prompt_lens=[32, 128], batches=[1, 4], context=32, decode_steps=4, trials=3,
                         paths=["torch_lowrank", "two_matmul"], rep_ms=200.0),
    ("cpu", True): dict(keep=[0.6], prompt_lens=[8], batches=[1], context=8, decode_steps=2, trials=2,
                        paths=["torch_lowrank", "two_matmul"], rep_ms=20.0),
}


def _add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=_DTYPES, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run: few, small cases")
    p.add_argument("--multiple-of", type=int, default=1,
                   help="round uniform ranks down to a multiple of this (tensor-core alignment; default 1)")
    p.add_argument("--rep-ms", type=float, default=None, help="sampling time per timed case, in ms")
    p.add_argument("--json", metavar="PATH", help="write the results, environment and command as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the printed markdown table to PATH")


def _add_kernels_parser(sub) -> None:
    p = sub.add_parser(
        "kernels", help="time dense vs low-rank layer implementations",
        description="Time each provider (dense F.linear, torch two-matmul paths, the fused Triton kernel) on "
        "real models' layer shapes at rank k = floor(keep·m·n/(m+n)), after checking it against float64. "
        "Reports median ms, GB/s, TFLOP/s and fractions of the roofline measured in the same run.",
    )
    p.add_argument("--models", nargs="+", help="model shape tables (llama2-7b llama3-8b qwen2.5-7b smollm2-135m)")
    p.add_argument("--layers", nargs="+", help="projections (q k v o gate up down; default all)")
    p.add_argument("--keep", nargs="+", type=float, help="kept fractions, each in (0, 1) (default 0.4 0.6 0.8)")
    p.add_argument("--tokens", nargs="+", type=int, help="rows of x (T) (default 1 4 16 64 512 2048 8192 on CUDA)")
    p.add_argument("--providers", nargs="+",
                   help="dense torch_lowrank two_matmul triton (default: all; on CPU, triton only when "
                   "TRITON_INTERPRET=1)")
    _add_common_options(p)
    p.set_defaults(run=cmd_kernels)


def _add_e2e_parser(sub) -> None:
    p = sub.add_parser(
        "e2e", help="prefill and decode speed of a compressed model vs its dense counterpart",
        description="Prefill latency and static-cache decode throughput (CUDA-graph replays on a GPU) and peak "
        "memory of a compressed checkpoint, or of a random model built from a known config "
        "(--shape-only), against the dense model of the same shapes (keep 1.0).",
    )
    p.add_argument("model", nargs="?", help="compressed checkpoint directory (from 'lowrank-infer compress')")
    p.add_argument("--shape-only", action="store_true", help="random weights of --config's shapes, no checkpoint")
    p.add_argument("--config",
                   help="with --shape-only: llama2-7b, llama3-8b, qwen2.5-7b, smollm2-135m, or a config.json")
    p.add_argument("--keep", nargs="+", type=float,
                   help="with --shape-only: kept fractions, uniform ranks (default 0.6, or none with --plan)")
    p.add_argument("--plan", nargs="+", metavar="PLAN",
                   help="with --shape-only: rank-plan JSON files (from 'lowrank-infer plan' or a checkpoint's "
                   "rank_plan.json) for --config's model; each is measured with random factors at its ranks")
    p.add_argument("--prompt-lens", nargs="+", type=int, help="prefill prompt lengths (default 128 2048 on CUDA)")
    p.add_argument("--batches", nargs="+", type=int, help="decode batch sizes (default 1 8 32 on CUDA)")
    p.add_argument("--context", type=int, help="tokens in the KV cache before timed decode steps (default 512)")
    p.add_argument("--decode-steps", type=int, help="decode steps per timed trial (default 32)")
    p.add_argument("--trials", type=int, help="timed decode trials; the median is reported (default 5)")
    p.add_argument("--paths", nargs="+", help="low-rank paths: triton torch_lowrank two_matmul (two_matmul = the default cuBLAS backend)")
    _add_common_options(p)
    p.set_defaults(run=cmd_e2e)


def _add_bench_commands(sub) -> None:
    _add_kernels_parser(sub)
    _add_e2e_parser(sub)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with ``kernels`` and ``e2e``) to the ``lowrank-infer`` sub-commands.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned.

    Returns:
        The ``bench`` parser.
    """
    p = subparsers.add_parser("bench", help="kernel and end-to-end speed benchmarks",
                              description="Speed benchmarks; results as a markdown table and, with --json, a file.")
    _add_bench_commands(p.add_subparsers(dest="bench_command", required=True, metavar="BENCH"))
    return p


# ---------------------------------------------------------------- helpers


def _options(args, defaults: dict) -> dict:
    """``defaults`` overridden by the flags given on the command line."""
    return {name: default if getattr(args, name) is None else getattr(args, name) for name, default in defaults.items()}


def _dtype(args, device: torch.device) -> torch.dtype:
    return getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))


def _positive(flag: str, values) -> None:
    if any(v < 1 for v in values):
        raise ValueError(f"{flag} must be positive integers, got {values}")


def _start(args) -> torch.device:
    from lowrank_infer.bench.timing import resolve_device

    device = resolve_device(args.device)
    if args.rep_ms is not None and args.rep_ms <= 0:
        raise ValueError(f"--rep-ms must be positive, got {args.rep_ms}")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path and Path(path).is_dir():  # found now, not after the whole benchmark has run
            raise ValueError(f"{flag} {path} is a directory; give a file path")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _document(kind: str, args, device: torch.device, dtype: torch.dtype, **fields) -> dict:
    from lowrank_infer.bench.output import command_line, environment

    return {"benchmark": kind, "command": command_line(),
            "args": {k: v for k, v in vars(args).items() if not callable(v)},
            "environment": environment(device), "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), **fields}


# ---------------------------------------------------------------- commands


def cmd_kernels(args) -> int:
    """Run ``bench kernels``."""
    from lowrank_infer.bench.kernels import KernelSettings, markdown_report, run_kernel_bench
    from lowrank_infer.bench.output import write_outputs
    from lowrank_infer.bench.providers import default_providers, resolve_providers
    from lowrank_infer.bench.roofline import measure_peaks
    from lowrank_infer.bench.shapes import LAYERS, layer_shapes, rank_for_keep

    device = _start(args)
    opts = _options(args, KERNEL_DEFAULTS[(device.type, args.quick)])
    dtype = _dtype(args, device)
    shapes = layer_shapes(opts["models"], opts["layers"] or list(LAYERS))
    for keep in opts["keep"]:  # a keep outside (0, 1) or a dense layer fails here, before any timing
        for shape in shapes:
            rank_for_keep(shape.m, shape.n, keep, _multiple_of(args))
    _positive("--tokens", opts["tokens"])
    providers = resolve_providers(args.providers or default_providers(device))
    settings = KernelSettings(shapes, opts["keep"], opts["tokens"], providers, device, dtype, opts["rep_ms"],
                              _multiple_of(args))
    peaks = measure_peaks(device, dtype, opts["rep_ms"])
    rows = run_kernel_bench(settings, peaks)
    opts.update(layers=[s.layer for s in shapes], providers=[p.name for p in providers])
    document = _document("kernels", args, device, dtype, settings=opts, peaks=peaks.to_dict(), rows=rows)
    write_outputs(document, markdown_report(document), args.json, args.markdown)
    return 0


def _multiple_of(args) -> int:
    if args.multiple_of < 1:
        raise ValueError(f"--multiple-of must be >= 1, got {args.multiple_of}")
    return args.multiple_of


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
    keeps = args.keep or ([] if plans else opts["keep"])
    keeps = [check_keep(keep) for keep in keeps]
    return shape_only_variants(hf_config(args.config), args.config, keeps, device, dtype, _multiple_of(args), plans)


def cmd_e2e(args) -> int:
    """Run ``bench e2e``."""
    from lowrank_infer.bench.e2e import E2ESettings, check_paths, markdown_report, run_e2e_bench
    from lowrank_infer.bench.output import write_outputs

    device = _start(args)
    opts = _options(args, E2E_DEFAULTS[(device.type, args.quick)])
    dtype = _dtype(args, device)
    for flag, values in (("--prompt-lens", opts["prompt_lens"]), ("--batches", opts["batches"]),
                         ("--context", [opts["context"]]), ("--decode-steps", [opts["decode_steps"]]),
                         ("--trials", [opts["trials"]])):
        _positive(flag, values)
    label, variants = _e2e_variants(args, opts, device, dtype)
    opts["keep"] = [variant.keep for variant in variants]
    opts["plan"] = args.plan or []
    settings = E2ESettings(opts["prompt_lens"], opts["batches"], opts["context"], opts["decode_steps"], opts["trials"],
                           check_paths(opts["paths"]), device, dtype, opts["rep_ms"])
    rows = run_e2e_bench(variants, settings)
    document = _document("e2e", args, device, dtype, model=label, shape_only=args.shape_only, settings=opts, rows=rows)
    write_outputs(document, markdown_report(document), args.json, args.markdown)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``lowrank-infer bench`` on its own: ``python -m lowrank_infer.bench {kernels,e2e} …``."""
    parser = argparse.ArgumentParser(prog="lowrank-infer bench", description="Speed benchmarks.")
    _add_bench_commands(parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH"))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as err:
        print(f"lowrank-infer bench: error: {err}", file=sys.stderr)
        return 1
