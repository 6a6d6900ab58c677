"""Healing schedules compared on one checkpoint: the same dense targets, windows and factors to
start from, healed under each schedule and rate, then scored on WikiText-2 test and Python's docstrings,
and on the held-out part of ``--calib-file`` (``held``: the score to choose by, as compress never fits
there; see ``held_perplexity.py``).

The checkpoint is a compressed model that was not healed (compress without --heal-steps); the
compress arguments after ``--`` are the ones it was made with plus the healing to compare, so that
the healing windows (and their dense targets) are those that ``compress --heal-steps`` would use.
A schedule is ``constant`` or ``linear`` (the rate decayed to nothing over the run); ``--lrs``
lists relative rates to try under each (default: compress's ``--heal-lr``), ``--warmups`` the
steps over which the rate first rises (default: compress's ``--heal-warmup``), and ``--top-ks`` how
many of the dense model's most likely tokens the loss matches (default: compress's
``--heal-top-k``; the targets are recorded once, at the largest, and cut to each).

usage: python benchmarks/heal_schedule.py CHECKPOINT --schedules constant,linear [--lrs 1e-3,2e-3] [--warmups 0,20] \\
           [--top-ks 64,256] \\
           -- --model smollm2-135m --keep 0.8 --heal-steps 400 ... (compress's own arguments)
"""
from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys

import torch

from lowrank_infer import cli
from lowrank_infer.bench.output import environment
from lowrank_infer.evaluate import perplexity
from lowrank_infer.healing import HealConfig, heal
from lowrank_infer.io import load_compressed

TEXTS = {"wikitext2": "../shared/data/wikitext2/test.raw.txt", "python-docs": "python-docs"}
SCHEDULES = {"constant": False, "linear": True}


def _healing_targets(compress_args: list[str], top_k: int | None = None):
    """The parsed arguments, the dense targets of compress's healing windows (``top_k`` tokens a
    position, default its ``--heal-top-k``), and the held-out part of the calibration text (None
    when every window is generated)."""
    args = cli.build_parser().parse_args(["compress", "--out", "unused", *compress_args])
    args.heal_top_k = top_k or args.heal_top_k
    if not args.heal_steps:
        raise SystemExit("pass --heal-steps N among compress's arguments (after --)")
    config = cli._method_config(args)
    model, tokenizer, _ = cli._load_for_analysis(args)
    source = cli._calib_source(args, tokenizer, config, None, model, "cpu")
    held = source.text[1] if source.text is not None else None
    return args, config, tokenizer, cli._dense_targets(args, model, source, "cpu", config.compute_dtype), held


def _numbers(text: str | None, flag: str, kind, *, zero: bool = False) -> list | None:
    """Comma-separated numbers, positive (or, with ``zero``, non-negative)."""
    try:
        values = [kind(v) for v in text.split(",")] if text else None
    except ValueError:
        raise SystemExit(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if values and (min(values) < 0 if zero else min(values) <= 0):
        raise SystemExit(f"{flag} must be {'non-negative' if zero else 'positive'}, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="after --: compress's own arguments, "
                                     "those the checkpoint was made with and --heal-steps N")
    parser.add_argument("checkpoint", help="a compressed checkpoint that was not healed")
    parser.add_argument("--schedules", default="constant,linear")
    parser.add_argument("--lrs", default=None, help="relative healing rates, comma-separated (default: --heal-lr)")
    parser.add_argument("--warmups", default=None, help="warmup steps, comma-separated (default: --heal-warmup)")
    parser.add_argument("--top-ks", default=None, help="dense tokens matched per position, comma-separated "
                        "(default: --heal-top-k)")
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens per text")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, compress_args = parser.parse_args(argv[:split]), argv[split + 1:]
    schedules = args.schedules.split(",")
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown:
        raise SystemExit(f"unknown schedule {unknown[0]!r}; known: {', '.join(SCHEDULES)}")
    lrs, top_ks = _numbers(args.lrs, "--lrs", float), _numbers(args.top_ks, "--top-ks", int)
    warmups = _numbers(args.warmups, "--warmups", int, zero=True)
    print("command: python benchmarks/heal_schedule.py " + shlex.join(sys.argv[1:]))
    print(f"machine: {environment(torch.device('cpu'))['device_label']}, {torch.get_num_threads()} threads")
    parsed, config, tokenizer, targets, held = _healing_targets(compress_args, max(top_ks) if top_ks else None)
    texts = {name: cli._eval_tokens(path, tokenizer) for name, path in TEXTS.items()}
    if held is not None:
        texts["held"] = held
    for schedule, lr, warmup, top_k in itertools.product(schedules, lrs or [parsed.heal_lr],
                                                         warmups or [parsed.heal_warmup], top_ks or [parsed.heal_top_k]):
        model = load_compressed(args.checkpoint, pack=False)
        heal_config = HealConfig(steps=parsed.heal_steps, lr=lr, batch_size=parsed.heal_batch,
                                 compute_dtype=config.compute_dtype, decay=SCHEDULES[schedule], warmup=warmup)
        # min: a vocabulary smaller than top_k was recorded whole (teacher_targets caps it)
        report = heal(model, *(t.top(min(top_k, t.logp.shape[-1])) for t in targets), heal_config)
        row = {"schedule": schedule, "relative_lr": lr, "warmup": warmup, "top_k": top_k, "steps": parsed.heal_steps, "steps_run": report.steps_run,
               "best_step": report.best_step, "held_kl_before": round(report.held_before, 6),
               "held_kl_after": round(report.held_after, 6), "healing_seconds": round(report.seconds, 1)}
        for name, tokens in texts.items():
            row[name] = round(perplexity(model, tokens, seq_len=512, max_windows=args.windows, batch_size=1,
                                         progress=False)["perplexity"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
