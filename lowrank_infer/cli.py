"""The ``lowrank-infer`` command: compress, plan, eval, info, generate, bench."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import torch

from lowrank_infer import offload
from lowrank_infer.allocation import METHODS, MethodConfig, RankPlan
from lowrank_infer.compress import analyze, compress, config_for, needs_calibration
from lowrank_infer.calib_source import CalibSource
from lowrank_infer.calibration import module_on
from lowrank_infer.data import (
    GENERATED, HELD_OUT_FRACTION, calibration_split, generated_ids, load_text, shared_data_file, tokenize_text,
)
from lowrank_infer.distributed import Ranks, process_group
from lowrank_infer.evaluate import check_seq_len, perplexity
from lowrank_infer.healing import TOP_K as HEAL_TOP_K, HealConfig, check_heal_memory, heal, teacher_targets
from lowrank_infer.harness import lm_eval_results, results_table, write_results
from lowrank_infer.io import PLAN_FILE, attach_plan, is_compressed_checkpoint, save_compressed
from lowrank_infer.models import ALIASES, load_model
from lowrank_infer.precision import COMPUTE_DTYPES, resolve_compute_dtype
from lowrank_infer.report import checkpoint_info, model_size

EXAMPLES = """\
examples:
  lowrank-infer compress --model smollm2-135m --keep 0.8 --calib-file valid.txt --out smol-0.8
  lowrank-infer eval smol-0.8 --text-file test.raw.txt --seq-len 512 --max-windows 40
  lowrank-infer info smol-0.8
  lowrank-infer generate smol-0.8 --prompt "The capital of France is"
"""

# Errors a user can cause with bad input (or a full disk, a read-only folder): reported in one
# line, without a traceback.
USER_ERRORS = (ValueError, OSError, ImportError)
DEFAULT_KEEP, DEFAULT_METHOD = 0.8, "uniform"


def _default_data_file(*parts: str) -> str | None:
    path = shared_data_file(*parts)
    return str(path) if path else None


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available, else cpu)")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"],
        help="parameter dtype (default: as stored; GGUF models load as float32)",
    )


def _add_calibration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib-file", default=_default_data_file("wikitext2", "valid.tokens.txt"),
        help="calibration text file, 'wikitext2' / 'c4' (training split via the datasets package), or "
        "'generated' (the model samples its own windows: no data needed); <unk> markers are dropped and "
        "the last 10%% held out; default: $LOWRANK_INFER_DATA/wikitext2/valid.tokens.txt when that exists",
    )
    p.add_argument(
        "--calib-generated", type=_fraction, default=0.0, metavar="F",
        help="fraction of the calibration windows (and of the held-out ones) the model samples itself, the "
        "rest cut from --calib-file; mixing pulls the statistics toward the model's own domain rather than "
        "one corpus's (on SmolLM2 at keep 0.8, 0.5 cut perplexity on other text 3-6.5x, helped ARA on "
        "WikiText-2 and cost uniform and D-Rank 6-7%% there: benchmarks/results/quality_smollm2_findings.md). "
        "Costs generation time: the fitting and "
        "held-out samples, 2 x F x --calib-samples windows, are sampled --batch-size at a time, fastest when "
        "one batch holds them all. --heal-steps trains on each generated fitting window once, on the "
        "text for the rest. Default 0; --calib-file generated = 1")
    p.add_argument(
        "--calib-sample-len", type=_positive_int, default=None, metavar="N",
        help="with --calib-generated: tokens per generated sample; shorter samples, each started afresh, are "
        "joined into --seq-len windows, so the same tokens cover more topics (on SmolLM2 at keep 0.8, 128 "
        "cut perplexity on off-domain text from 48 to 29-31 and cost 2-3%% on WikiText-2: "
        "benchmarks/results/quality_smollm2_findings.md). "
        "Default: one sample per window")
    p.add_argument("--calib-samples", type=_positive_int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="calibration windows per forward pass, and rows per sampling batch with --calib-generated "
                   "(default 8; SmolLM2's 128 samples took 66 s on 2 cores in one batch of 128, 88 s in four of 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for picking calibration windows")


def _add_allocation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias (smollm2-135m), .gguf file, model directory or hub id")
    p.add_argument("--keep", type=float, help=f"fraction of target-linear parameters kept, in (0, 1] (default {DEFAULT_KEEP})")
    p.add_argument("--method", choices=list(METHODS), help=f"rank allocation (default {DEFAULT_METHOD})")
    p.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help="allocation hyper-parameter (repeatable), e.g. --param beta=0.3 for D-Rank (default beta=auto: the candidate 0, 0.1, 0.2, 0.3 with the lowest calibration loss) or --param steps=200 for ARA",
    )
    p.add_argument("--no-whiten", action="store_true", help="plain SVD instead of data-whitened SVD")
    p.add_argument(
        "--shrinkage", type=_shrinkage, default=0.0,
        help="pull each layer's input statistics XᵀX toward a scaled identity (median diagonal) by this "
        "fraction in [0, 1) before whitening, trusting less the directions the calibration text leaves "
        "quiet; on SmolLM2, 0.1 helped ARA's factors on other text and hurt uniform ranks' "
        "(benchmarks/results/quality_smollm2_findings.md). 'auto': "
        "each layer's strength among 0, 0.03, 0.1, 0.3 by two-fold cross-validation over the calibration "
        "windows (about 9 SVDs per layer instead of 1). Default 0")
    p.add_argument(
        "--sequential", action="store_true",
        help="after allocation, refit each layer block by block on the inputs the compressed model feeds it "
        "(error compensation; about three calibration passes more)",
    )
    p.add_argument("--ridge", type=float, default=1e-2,
                   help="with --sequential: pull toward the dense weight, relative to the median input energy (default 0.01)")
    p.add_argument(
        "--refine-steps", type=int, default=0,
        help="block refinement: block by block on the compressed model's own inputs, train each block's factors "
        "(and the layers the plan keeps dense) up to this many Adam steps (2 calibration windows each) toward "
        "the dense block's outputs, stopping "
        "on held-out calibration windows; starts from --sequential's refit when given, else from the "
        "whitened SVD. 0 (default) = none")
    p.add_argument("--refine-lr", type=float, default=MethodConfig.refine_lr,
                   help="Adam learning rate of --refine-steps, relative to each factor's scale: a tensor trains at this "
                   f"times its RMS (default {MethodConfig.refine_lr:g})")
    p.add_argument(
        "--compute-dtype", choices=("auto", *COMPUTE_DTYPES), default="auto",
        help="dtype of the forward passes that record the dense model's healing targets and train (ARA, "
        "--refine-steps with the block streams it reads unless --sequential fits on them, --heal-steps): "
        "bfloat16 runs them under autocast, 1.2-1.8x faster on hardware with "
        "native bfloat16 matmuls; calibration statistics, refits and factorizations stay float64, and the "
        "model samples its calibration windows in its own dtype, either way. auto (default): bfloat16 on a GPU "
        "that has it or a CPU with AVX512-BF16/AMX, else float32")
    p.add_argument(
        "--multiple-of", type=int, default=1,
        help="make every rank a multiple of this; 16 keeps GPU GEMMs on their aligned fast paths "
        "(unaligned ranks fall off their fast paths; see README). Default 1: exact ranks",
    )
    p.add_argument("--include", action="append", help="regex: only linears whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", help="regex: skip linears whose name matches (repeatable)")
    p.add_argument(
        "--work-dir",
        help="keep each finished block's factors in this directory instead of in memory (bounded memory "
        "for large models; kept afterwards, delete it when done); a killed run continues with --resume",
    )
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --work-dir from its last finished block (same settings required)")
    p.add_argument(
        "--weights-on-disk", action="store_true",
        help="keep the model's decoder blocks on disk and read one at a time (the alias or a local safetensors "
        "directory; uniform, D-Rank with a fixed --param beta, or --plan)",
    )
    _add_calibration_options(p)
    _add_model_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowrank-infer",
        description="Compress Hugging Face LLMs by whitened SVD under a parameter budget, save them as "
        "HF checkpoints, and run/evaluate/benchmark them. 'keep' = parameters kept ÷ parameters "
        "of the target linears (every nn.Linear inside the decoder blocks).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="compress a model and save it", description="Calibrate, factorize, allocate ranks, swap layers, save a checkpoint.")
    _add_allocation_options(p)
    p.add_argument("--plan", help="apply this rank-plan JSON instead of running --method")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--eval-file", help="also report perplexity before and after on this text file")
    p.add_argument("--eval-windows", type=_positive_int, default=8, help="windows of --seq-len for --eval-file (default 8)")
    p.add_argument(
        "--heal-steps", type=int, default=0,
        help="after compressing, train the low-rank factors this many steps toward the dense model's "
        "next-token distributions (KL on calibration text), stopping early when held-out calibration "
        "windows stop improving; 0 (default) = no healing. For SmolLM2-135M on 2 cores of an AMD EPYC "
        "with AVX512-BF16 a step (one 512-token window, the held-out scores) took 1.7-2 s and its window's dense "
        "targets 0.8 s (benchmarks/results/cpu/heal_step_breakdown_smollm2_epyc.txt); on a Xeon with AMX a step "
        "took 1.2 s (--compute-dtype)")
    p.add_argument("--heal-lr", type=float, default=HealConfig.lr,
                   help=f"Adam learning rate of --heal-steps, relative to each factor's scale: a tensor trains at this "
                   f"times its RMS (default {HealConfig.lr:g}, chosen at 100 steps; at 320 steps 2e-3 gave SmolLM2 a lower "
                   f"perplexity on the calibration text's held-out part)")
    p.add_argument("--heal-schedule", choices=("linear", "constant"), default="linear",
                   help="--heal-lr over the run: falling linearly to zero (default; on SmolLM2 a lower held-out "
                   "loss than constant after 250 steps, the same after 400) or constant")
    p.add_argument("--heal-warmup", type=int, default=0, metavar="STEPS",
                   help="raise --heal-lr linearly over the first STEPS steps, times the schedule's factor "
                   "(default 0: none). On SmolLM2 at keep 0.8 a 100-step warmup of the best setting's 400 steps "
                   "ended at a lower held-out KL (0.3227 against 0.3256) but not a lower perplexity (37.48 "
                   "against 37.32, same windows; benchmarks/results/quality_smollm2_findings.md)")
    p.add_argument("--heal-seq-len", type=_positive_int, default=None,
                   help="tokens per healing window (default: --seq-len): shorter windows never teach the factors "
                   "what the dense model does with longer context")
    p.add_argument("--heal-top-k", type=_positive_int, default=HEAL_TOP_K,
                   help=f"the dense model's most likely next tokens that --heal-steps matches at every position "
                   f"(default {HEAL_TOP_K}); the rest of the vocabulary is one bucket. Its targets take 8 bytes a "
                   f"token per position and window (1 MiB a 512-token window at {HEAL_TOP_K}; 256 matched "
                   f"held-out calibration text better than 64 on SmolLM2 and as well as 1024)")
    p.add_argument("--heal-batch", type=_positive_int, default=HEAL_BATCH,
                   help=f"healing windows per step (default {HEAL_BATCH}, sized for a CPU); a GPU trains on "
                   f"16 or more in about the time of {HEAL_BATCH}, so each step sees more text")
    p.add_argument("--heal-windows", type=_positive_int, default=None, metavar="N",
                   help=f"distinct healing windows whose dense targets are recorded; the steps cycle through them "
                   f"(default: one per window trained on, --heal-steps x --heal-batch, at most {HEAL_MAX_WINDOWS}). "
                   "Fewer windows save the targets' forward passes (0.5-0.75 s a 512-token window for SmolLM2 on 2 "
                   "EPYC cores) but can overfit: in the best setting's 400 steps, 200 windows read twice matched 400 "
                   "at one draw and at another stopped early on a rising held-out loss (37.07 against 36.02; "
                   "benchmarks/results/quality_smollm2_findings.md)")
    p.set_defaults(run=cmd_compress)

    p = sub.add_parser("plan", help="compute a rank plan (JSON) without compressing", description="Run an allocation method and write its rank plan.")
    _add_allocation_options(p)
    p.add_argument("--out", required=True, help="rank-plan JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser("eval", help="perplexity of a model or checkpoint", description="Perplexity: non-overlapping windows, exp(mean token NLL).")
    p.add_argument("model", help="checkpoint directory, alias, .gguf file or hub id")
    p.add_argument("--text-file", default=None, help="evaluation text file, 'wikitext2' / 'c4' (test / validation split via datasets), or 'python-docs' "
        "(Python's own docstrings: an off-domain text on every machine); default: $LOWRANK_INFER_DATA/wikitext2/test.raw.txt when set")
    p.add_argument("--seq-len", type=int, default=2048, help="window length (default 2048)")
    p.add_argument("--max-windows", type=_positive_int, default=None, help="evaluate only the first W windows")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_model_options(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser(
        "lm-eval", help="run the LM Evaluation Harness on a model or checkpoint",
        description="Evaluate with lm-eval tasks (pip install 'lowrank-infer[eval]'). The model is loaded "
        "by lowrank-infer and handed to lm-eval's HF backend; --include-path adds task YAMLs, e.g. over "
        "local JSON files for offline runs.",
    )
    p.add_argument("model", help="checkpoint directory, alias, .gguf file or hub id")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names, e.g. hellaswag,arc_easy")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (below 1: that fraction)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="documents per forward pass")
    p.add_argument("--output", help="write lm-eval's full results as JSON to this file")
    p.add_argument("--log-samples", action="store_true", help="include every document's requests and responses in --output")
    p.add_argument("--json", action="store_true", help="print the per-task metrics as JSON instead of a table")
    _add_model_options(p)
    p.set_defaults(run=cmd_lm_eval)

    p = sub.add_parser("info", help="ranks and sizes of a compressed checkpoint", description="Per-layer ranks, dense fallbacks, parameters and bytes before/after.")
    p.add_argument("checkpoint", help="directory written by 'compress'")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("generate", help="generate text", description="Greedy generation from a prompt.")
    p.add_argument("model", help="checkpoint directory, alias, .gguf file or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_model_options(p)
    p.set_defaults(run=cmd_generate)

    from lowrank_infer.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


# ---------------------------------------------------------------- helpers


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into a usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _shrinkage(text: str) -> float | str:
    """argparse type: 'auto' or a number (the config checks its range)."""
    return text if text == "auto" else float(text)


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(text)
    return value


def _device(args) -> str:
    if args.device:
        try:
            torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1 …)") from None
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} requested but no CUDA GPU is available")
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(args):
    return getattr(torch, args.dtype) if args.dtype else None


def _load(spec: str, args, device: str | None = None):
    return load_model(spec, dtype=_dtype(args), device=device or _device(args))


def _parse_params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--param expects NAME=VALUE, got {pair!r}")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    return params


def _needs_select(config, plan) -> bool:
    return bool(config.refine_steps) or (plan is None and config.needs_model_forward)


def _calib_source(args, tokenizer, config, plan, model, device) -> CalibSource | None:
    """The run's calibration windows (``None`` when it needs none): ``--calib-generated`` of each
    set sampled by the model (all of them with ``--calib-file generated``), the rest cut from the
    cleaned ``--calib-file``."""
    if not (needs_calibration(config, plan) or getattr(args, "heal_steps", 0) or _needs_select(config, plan)):
        return None
    if args.calib_file == GENERATED and args.calib_generated not in (0.0, 1.0):
        raise ValueError(f"--calib-file generated samples every window, which contradicts --calib-generated "
                         f"{args.calib_generated:g}: pass a text file to mix")
    fraction = 1.0 if args.calib_file == GENERATED else args.calib_generated
    if args.calib_sample_len is not None and fraction == 0.0:
        raise ValueError("--calib-sample-len sets the length of generated samples, and none are generated: "
                         "pass --calib-generated F (or --calib-file generated)")
    if fraction < 1.0 and not args.calib_file:
        raise ValueError("calibration text needed: pass --calib-file FILE (or 'wikitext2'), or set LOWRANK_INFER_DATA, "
                         "or --calib-generated 1 to sample every window from the model")
    if fraction > 0.0 and (model is None or offload.holds(model)):
        raise ValueError("generated calibration samples text from the whole model, which --weights-on-disk never holds")

    def sample(count, seq_len, seed):
        with module_on(model, device):
            return generated_ids(model, tokenizer, count, seq_len, seed=seed, batch_size=args.batch_size, progress=True)

    text = None
    if fraction < 1.0:
        text = calibration_split(args.calib_file, tokenizer)
    return CalibSource(text, fraction, sample if fraction > 0.0 else None,
                       pool_size=round(fraction * args.calib_samples), pool_len=args.seq_len, seed=args.seed,
                       sample_len=args.calib_sample_len)


def _calibration_ids(args, source: CalibSource | None, config, plan=None):
    if not needs_calibration(config, plan) and not getattr(args, "heal_steps", 0):
        return None
    real, _ = source.split(args.calib_samples)
    if real and source.text[0].numel() < real * args.seq_len:
        raise ValueError(f"--calib-file leaves {source.text[0].numel():,} tokens once <unk> markers and the held-out "
                         f"{HELD_OUT_FRACTION:.0%} are set aside, fewer than the {real} x {args.seq_len} "
                         "requested: pass a longer text, fewer --calib-samples or a larger --calib-generated")
    return source.windows(args.calib_samples, args.seq_len, "fit")


def _select_ids(args, source: CalibSource | None, config, plan):
    """Windows for the choices made on the model's output (ARA's training, D-Rank's beta="auto",
    where block refinement stops): held-out windows, never the whitening windows."""
    if not _needs_select(config, plan):
        return None
    return source.windows(args.calib_samples, args.seq_len, "held", seed_offset=3, what=config.name)


# Healing trains on windows of the fitting part of the calibration windows and stops on windows
# of their held-out part; a step takes --heal-batch windows, and HEAL_HELD_WINDOWS are scored each
# time. Generated windows train once each, the text fills the rest of their share: cycled ten
# times over a 330-step run, SmolLM2's 16 taught less than fresh text, on the docstrings too
# (quality_smollm2_v19_heal330_noreuse against v19_heal330). At most HEAL_MAX_WINDOWS distinct
# training windows (their dense targets: --heal-top-k tokens' log-probabilities and ids per
# position, 1 MiB a 512-token window at the default) are recorded, or --heal-windows of them;
# longer runs cycle.
HEAL_BATCH, HEAL_HELD_WINDOWS, HEAL_MAX_WINDOWS = 1, 8, 1024


def _heal_windows(args, source: CalibSource) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = args.heal_seq_len or args.seq_len
    real, generated = source.split(HEAL_HELD_WINDOWS)
    if generated and seq_len > args.seq_len:
        raise ValueError(f"--heal-seq-len {seq_len} is longer than the generated calibration windows "
                         f"(--seq-len {args.seq_len}), from which healing windows are cut: lower it")
    if real and source.text[1].numel() < real * seq_len:
        raise ValueError(f"healing holds out the last {HELD_OUT_FRACTION:.0%} of --calib-file ({source.text[1].numel():,} "
                         f"tokens), fewer than {real} windows of {seq_len} tokens (--heal-seq-len): pass a longer text")
    count = args.heal_windows or min(args.heal_steps * args.heal_batch, HEAL_MAX_WINDOWS)
    train = source.windows(count, seq_len, "fit", seed_offset=1, what="healing", reuse_generated=False)
    return train, source.windows(HEAL_HELD_WINDOWS, seq_len, "held", seed_offset=2, what="healing")


def _method_config(args, plan=None):
    """The method config the flags describe. With a plan, the method and keep default to the
    plan's, and a flag that says otherwise is an error rather than silently ignored."""
    method = args.method or (plan.method if plan is not None else DEFAULT_METHOD)
    keep = args.keep if args.keep is not None else (plan.keep_target if plan is not None else DEFAULT_KEEP)
    settings = dict(keep=keep, multiple_of=args.multiple_of, whiten=not args.no_whiten, shrinkage=args.shrinkage,
                    sequential=args.sequential,
                    ridge=args.ridge, refine_steps=args.refine_steps, refine_lr=args.refine_lr, include=args.include or (), exclude=args.exclude or (),
                    compute_dtype=resolve_compute_dtype(args.compute_dtype, _device(args)),
                    **_parse_params(args.param))
    if plan is not None and method not in METHODS:
        return MethodConfig().replace(**settings)  # a plan from elsewhere: only applied
    config = config_for(method, **settings)
    if plan is not None:
        config.check_plan(plan)
    return config


def _check_seq_len(args, model=None) -> None:
    """``--seq-len`` of at least 2 (a window predicts seq_len - 1 tokens); with the model loaded,
    also within its positions."""
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
    if model is not None:
        check_seq_len(model, args.seq_len)


def _check_out_dir(path: str, overwrite: bool) -> None:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")


def _check_out_file(path: str, overwrite: bool) -> None:
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give the path of a JSON file")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists (pass --overwrite to replace it)")


def _eval_tokens(path: str, tokenizer):
    return tokenize_text(tokenizer, load_text(path, split="eval"))


def _perplexity_on(device: str, model, tokens, args) -> dict:
    with module_on(model, device):
        return perplexity(model, tokens, seq_len=args.seq_len, max_windows=args.eval_windows)


def _say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- commands


def cmd_compress(args) -> int:
    # Everything that can be checked without the model fails here, before the slow load.
    _check_out_dir(args.out, args.overwrite)
    _check_seq_len(args)
    _check_resume(args)
    plan = RankPlan.load(args.plan) if args.plan else None
    device = _device(args)
    config = _method_config(args, plan)
    with process_group(device) as ranks:
        return _compress(args, plan, device, config, ranks)


def _compress(args, plan, device: str, config, ranks: Ranks) -> int:
    """``compress`` on one rank (of one, or of those ``torchrun`` started); rank 0 evaluates,
    writes and reports."""
    start = time.perf_counter()
    _quiet_unless(ranks.main)
    # The model stays in host memory (or on disk); calibration moves one block at a time to --device.
    model, tokenizer, model_id = _load_for_analysis(args)
    _check_seq_len(args, model)
    if args.heal_steps and torch.device(device).type == "cuda":
        check_heal_memory(model, config.keep, torch.cuda.mem_get_info(device)[0], device,
                          include=config.include, exclude=config.exclude)
    source = _calib_source(args, tokenizer, config, plan, model, device)
    calib = _calibration_ids(args, source, config, plan)
    eval_tokens = _eval_tokens(args.eval_file, tokenizer) if args.eval_file and ranks.main else None
    before = model_size(model)
    ppl_before = _perplexity_on(device, model, eval_tokens, args) if eval_tokens is not None else None
    targets = _dense_targets(args, model, source, device, config.compute_dtype) if args.heal_steps else None
    select = _select_ids(args, source, config, plan)
    result = compress(model, config, calib_ids=calib, plan=plan, model_id=model_id, batch_size=args.batch_size,
                      device=device, work_dir=args.work_dir, resume=args.resume, progress=ranks.main,
                      select_ids=select)
    if not ranks.main:
        return 0
    _record_calibration(model, result.plan, source)
    healed = _heal(args, model, targets, device, config.compute_dtype) if targets is not None else None
    if healed is not None:
        result.seconds["healing"] = healed.seconds
        result.plan.params["heal"] = {"steps": args.heal_steps, "batch": args.heal_batch, "relative_lr": args.heal_lr,
                                      "schedule": args.heal_schedule, "warmup": args.heal_warmup,
                                      "top_k": args.heal_top_k, "windows": len(targets[0].ids),
                                      "compute_dtype": config.compute_dtype,
                                      "steps_run": healed.steps_run,
                                      "best_step": healed.best_step, "held_kl_before": round(healed.held_before, 6),
                                      "held_kl_after": round(healed.held_after, 6)}
        attach_plan(model, result.plan)
    ppl_after = _perplexity_on(device, model, eval_tokens, args) if eval_tokens is not None else None
    metrics = {} if ppl_before is None else {
        f"perplexity, {ppl_after['windows']} x {args.seq_len} tokens of {Path(args.eval_file).name}": ppl_after["perplexity"],
        "perplexity of the dense model, same text": ppl_before["perplexity"]}
    base_model = ALIASES[args.model][2] if args.model in ALIASES else None
    save_compressed(model, args.out, tokenizer, overwrite=args.overwrite, metrics=metrics, base_model=base_model)
    after = model_size(model)
    summary = result.plan.summary()
    processes = f" on {ranks.world} processes" if ranks.world > 1 else ""
    _say(f"compressed {model_id} with {result.plan.method}{processes} in {time.perf_counter() - start:.1f} s "
         f"({', '.join(f'{k} {v:.1f} s' for k, v in result.seconds.items())})")
    _say(f"  keep target {result.plan.keep_target:.4f}, achieved {summary['keep_achieved']:.4f} "
         f"({summary['layers']} target linears, {summary['dense_layers']} kept dense)")
    _say(f"  target-linear params {summary['params_before']:,} -> {summary['params_after']:,}")
    _say(f"  whole-model params   {before['params']:,} -> {after['params']:,}; "
         f"bytes {before['bytes'] / 2**20:.1f} MiB -> {after['bytes'] / 2**20:.1f} MiB")
    refined = result.plan.params.get("refine")
    if refined:
        before, after = refined["held_error_before"], refined["held_error_after"]
        _say(f"  refinement: {refined['blocks_improved']} of {len(before)} blocks improved on held-out windows "
             f"({refined['dense_layers_trained']} layers kept dense trained with the factors); "
             f"last block's relative error {before[-1]:.4f} -> {after[-1]:.4f}")
    if healed is not None:
        _say(f"  healing: {healed.steps_run} steps, held-out KL {healed.held_before:.4f} -> {healed.held_after:.4f} "
             + (f"(kept step {healed.best_step})" if healed.best_step else "(no step improved it: factors unchanged)"))
    if ppl_before is not None:
        _say(f"  perplexity ({ppl_after['windows']} windows x {args.seq_len} tokens of {args.eval_file}): "
             f"{ppl_before['perplexity']:.3f} dense -> {ppl_after['perplexity']:.3f} compressed")
    if args.work_dir:
        _say(f"  work directory {args.work_dir} kept (delete it when no longer needed)")
    _say(f"  saved to {args.out}")
    return 0


def _record_calibration(model, plan: RankPlan, source: CalibSource | None) -> None:
    """A plan made or applied on partly generated windows says so (the rest of the calibration
    settings are the command's); with ``model``, its checkpoint will too."""
    if source is not None and source.generated:
        plan.params["calib_generated"] = source.generated
        if source.sample_len is not None:
            plan.params["calib_sample_len"] = source.sample_len
        if model is not None:
            attach_plan(model, plan)


def _dense_targets(args, model, source: CalibSource, device, compute_dtype: str):
    """The dense model's targets on the healing windows, recorded before compression changes it."""
    train, held = _heal_windows(args, source)
    with module_on(model, device), _heap_for_training():
        return [teacher_targets(model, ids, top_k=args.heal_top_k, compute_dtype=compute_dtype, progress=True)
                for ids in (train, held)]


def _heal(args, model, targets, device, compute_dtype: str):
    config = HealConfig(steps=args.heal_steps, lr=args.heal_lr, batch_size=args.heal_batch, compute_dtype=compute_dtype,
                        decay=args.heal_schedule == "linear", warmup=args.heal_warmup)
    with module_on(model, device), _heap_for_training():
        return heal(model, *targets, config, progress=True)


def _check_resume(args) -> None:
    if args.resume and not args.work_dir:
        raise ValueError("--resume needs --work-dir (the directory of the run to continue)")
    if args.weights_on_disk and getattr(args, "eval_file", None):
        raise ValueError("--eval-file measures the dense model, which --weights-on-disk never holds whole; "
                         "evaluate the checkpoint afterwards with 'lowrank-infer eval'")
    heal_steps = getattr(args, "heal_steps", 0)
    if heal_steps < 0:
        raise ValueError(f"--heal-steps must be >= 0, got {heal_steps}")
    if heal_steps and args.weights_on_disk:
        raise ValueError("--heal-steps trains the whole model, which --weights-on-disk never holds; heal without it")
    if heal_steps and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--heal-steps runs in one process; start it without torchrun")
    warmup = getattr(args, "heal_warmup", 0)
    if not 0 <= warmup <= heal_steps:
        raise ValueError(f"--heal-warmup must be from 0 to --heal-steps ({heal_steps}), got {warmup}")
    windows, trained = getattr(args, "heal_windows", None), heal_steps * getattr(args, "heal_batch", 1)
    if windows and windows > trained:
        raise ValueError(f"--heal-windows {windows} is more than the {trained} windows healing trains on "
                         "(--heal-steps x --heal-batch): lower it")


def _load_for_analysis(args):
    """The model to compress or plan for, on the CPU, or with its blocks on disk."""
    _return_freed_memory()
    return load_model(args.model, dtype=_dtype(args), device="cpu", weights_on_disk=args.weights_on_disk)


def _return_freed_memory() -> None:
    """Have glibc map allocations of 1 MiB and more on their own, so that freeing them returns
    the memory: compression frees each block's tensors before the next block, and from its
    default heap glibc would keep most of them, and the peak would grow block by block."""
    _mmap_threshold(1 << 20)


def _mmap_threshold(size: int) -> None:
    """glibc's M_MMAP_THRESHOLD: allocations of ``size`` bytes and more are mapped on their own."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, size)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@contextlib.contextmanager
def _heap_for_training():
    """Healing and its dense targets allocate and free the same activations every step; mapped
    on their own (:func:`_return_freed_memory`), each comes back as fresh pages the kernel must
    zero: SmolLM2's 250-step compress took 876 s that way and 796 s without (healing 400 s and
    381 s; ``quality_smollm2_v16/v17_*``). Up to glibc's largest default threshold (32 MiB)
    they are reused from the heap while these run."""
    _mmap_threshold(32 << 20)
    try:
        yield
    finally:
        _mmap_threshold(1 << 20)


def _quiet_unless(main: bool) -> None:
    """Ranks other than 0 print nothing of their own: no progress bars from transformers either."""
    if not main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def cmd_plan(args) -> int:
    if args.sequential or args.refine_steps:
        raise ValueError("--sequential and --refine-steps change the factors, not the ranks: pass them to "
                         "'compress --plan' with the plan this writes")
    _check_out_file(args.out, args.overwrite)
    _check_seq_len(args)
    _check_resume(args)
    device = _device(args)
    config = _method_config(args)
    with process_group(device) as ranks:
        _quiet_unless(ranks.main)
        model, tokenizer, model_id = _load_for_analysis(args)
        _check_seq_len(args, model)
        source = _calib_source(args, tokenizer, config, None, model, device)
        calib = _calibration_ids(args, source, config)
        select = _select_ids(args, source, config, None)
        plan, _, seconds = analyze(model, config, calib_ids=calib, model_id=model_id, batch_size=args.batch_size,
                                   device=device, work_dir=args.work_dir, resume=args.resume, progress=ranks.main,
                                   select_ids=select)
    if ranks.main:
        _record_calibration(None, plan, source)
        plan.save(args.out)
        summary = plan.summary()
        _say(f"{plan.method} plan for {model_id}: keep {plan.keep_target} -> achieved {summary['keep_achieved']:.4f}, "
             f"{summary['dense_layers']} dense layers, allocation {seconds.get('allocation', 0.0):.1f} s; wrote {args.out}")
    return 0


def cmd_eval(args) -> int:
    text_file = args.text_file or _default_data_file("wikitext2", "test.raw.txt")
    if not text_file:
        raise ValueError("no evaluation text: pass --text-file FILE (or 'wikitext2'), or set LOWRANK_INFER_DATA")
    _check_seq_len(args)  # the model's positions are checked by perplexity()
    model, tokenizer, model_id = _load(args.model, args)
    tokens = _eval_tokens(text_file, tokenizer)
    result = perplexity(model, tokens, seq_len=args.seq_len, max_windows=args.max_windows, batch_size=args.batch_size)
    result.update(model=model_id, text_file=text_file)
    if args.json:
        _say(json.dumps(result, indent=1))
    else:
        _say(f"{model_id}: perplexity {result['perplexity']:.4f} over {result['windows']} windows x "
             f"{result['seq_len']} tokens ({result['seconds']:.1f} s)")
    return 0


def cmd_lm_eval(args) -> int:
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if args.log_samples and not args.output:
        raise ValueError("--log-samples needs --output FILE")
    model, tokenizer, model_id = _load(args.model, args)
    results = lm_eval_results(model, tokenizer, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                              limit=args.limit, batch_size=args.batch_size, log_samples=args.log_samples)
    results["config"]["model"] = model_id  # lm-eval only sees an object; name what was evaluated
    if args.output:
        write_results(results, args.output)
    _say(json.dumps(results["results"], indent=1) if args.json else results_table(results))
    return 0


def cmd_info(args) -> int:
    path = Path(args.checkpoint)
    if not is_compressed_checkpoint(path):
        raise ValueError(f"{path} is not a lowrank_infer checkpoint")
    plan = RankPlan.load(path / PLAN_FILE)
    info = checkpoint_info(path, plan)
    if args.json:
        _say(json.dumps({"summary": info, "plan": plan.to_dict()}, indent=1))
        return 0
    _say(f"{path}: {plan.method} plan for {plan.model or 'unknown model'}, keep target {plan.keep_target}, "
         f"achieved {info['keep_achieved']:.4f}")
    _say(f"{'layer':<48} {'shape':>11} {'rank':>6} {'kept':>7}")
    for layer in plan.layers:
        rank = "dense" if layer.rank is None else str(layer.rank)
        _say(f"{layer.name:<48} {layer.out_features:>5}x{layer.in_features:<5} {rank:>6} {layer.params / layer.dense_params:>7.3f}")
    _say(f"target linears: {info['layers']} ({info['dense_layers']} dense), params "
         f"{info['target_params_before']:,} -> {info['target_params_after']:,}")
    _say(f"whole model: params {info['params_before']:,} -> {info['params_after']:,}; bytes "
         f"~{info['bytes_before_estimate'] / 2**20:.1f} MiB -> {info['bytes_after'] / 2**20:.1f} MiB")
    return 0


def cmd_generate(args) -> int:
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    model, tokenizer, _ = _load(args.model, args)
    if args.chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    _say(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as err:
        if os.environ.get("LOWRANK_INFER_DEBUG"):
            raise
        print(f"lowrank-infer {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
