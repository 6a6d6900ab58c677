"""Quality suite: perplexity of methods × keep values, from the ``lowrank-infer`` CLI itself.

For every method and keep it runs ``lowrank-infer compress`` into ``--work-dir`` (a finished
checkpoint there is reused, so an interrupted suite resumes) and ``lowrank-infer eval --json``
on it, plus one eval of the dense model, and writes a perplexity table as markdown and JSON
(with machine, versions, the suite's command and every command it ran). A method name ending
in ``-plain`` compresses with plain SVD (``--no-whiten``). With ``--plans DIR``, a plan file
``DIR/<model>_<method>_keep<keep>.json`` is applied (``compress --plan``) instead of running the
allocator again. Each row also reports the allocator's wall time (from ``compress``'s summary),
the mean rank per layer type and the number of layers left dense.

    python benchmarks/run_quality.py --model smollm2-135m --text-file test.raw.txt --calib-file valid.txt
    python benchmarks/run_quality.py --methods uniform drank --keeps 0.6 0.8 --dry-run
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from lowrank_infer.atomic import atomic_write_text
from lowrank_infer.bench.output import environment, markdown_table
from lowrank_infer.io import is_compressed_checkpoint

HERE = Path(__file__).resolve().parent
# Commands are recorded as a user would type them (paths as given, relative ones stay
# relative) and run through this interpreter.
CLI = ["lowrank-infer"]


# Method-name suffixes after the allocator, each a pipeline stage added ("ara-refine-heal").
VARIANTS = {"plain": ["--no-whiten"], "shrink": ["--shrinkage", "0.1"], "shrinkauto": ["--shrinkage", "auto"],
            "seq": ["--sequential"],
            # Half of every set of windows sampled by the model: 2 x 16, one batch of generation.
            "mix": ["--calib-generated", "0.5", "--batch-size", "32"],
            # With mix: each generated window joined from four 128-token samples (more topics, same tokens).
            "short": ["--calib-sample-len", "128"],
            # ARA trained against the dense model's next-token distributions instead of the text's tokens.
            "kl": ["--param", "loss=kl"],
            # Every forward pass in float32 (compress's default is bfloat16 where the hardware has it).
            "fp32": ["--compute-dtype", "float32"]}
# Stages that change what the allocator sees or trains on: the committed plans (made on text alone,
# ARA on cross-entropy) do not apply.
RANK_VARIANTS = {"mix", "short", "kl", "seed", "calib", "arasteps", "araseq", "arasamples", "arabatch",
                 "araorders"}
# Stages with a count: the bare name takes the default, a number after it overrides it ("heal400",
# "araseq512": ARA trains on the first 512 tokens of each held-out window instead of 128). "batch"
# after "mix" overrides its batch size (the last --batch-size wins).
COUNTED = {"refine": ("--refine-steps", "{}", 32), "heal": ("--heal-steps", "{}", 100),
           "healbatch": ("--heal-batch", "{}", 2), "heallr": ("--heal-lr", "{}e-4", 10),  # heallr30: 3e-3
           "healseq": ("--heal-seq-len", "{}", 256), "healtopk": ("--heal-top-k", "{}", 256),
           "healwarm": ("--heal-warmup", "{}", 0), "healwin": ("--heal-windows", "{}", 200),
           "calib": ("--calib-samples", "{}", 32),
           "batch": ("--batch-size", "{}", 8),
           "arasteps": ("--param", "steps={}", 100), "araseq": ("--param", "seq_len={}", 128),
           # "arasamples128": ARA trains on 128 pieces of 128 tokens, the held-out windows whole.
           "arasamples": ("--param", "samples={}", 32),
           # "arabatch2": ARA averages each step's gradient over 2 rows (half its variance, twice the time).
           "arabatch": ("--param", "batch_size={}", 1),
           # "araorders2": ARA from two row orders, the plan with the lower calibration loss kept.
           "araorders": ("--param", "orders={}", 1),
           # Another draw of every set of windows ("seed1"; the suite's other rows use compress's seed 0).
           "seed": ("--seed", "{}", 0)}


def variant_args(variant: str, method: str) -> list[str]:
    """compress's arguments for one variant name (``shrink``, ``refine``, ``refine128`` ...)."""
    if variant in VARIANTS:
        return VARIANTS[variant]
    counted = re.fullmatch(r"([a-z]+)(\d*)", variant)
    if counted and counted.group(1) in COUNTED:
        flag, value, default = COUNTED[counted.group(1)]
        return [flag, value.format(counted.group(2) or default)]
    known = [*VARIANTS, *(f"{name}[N]" for name in COUNTED)]
    raise SystemExit(f"unknown variant {variant!r} in {method!r}; known: {', '.join(known)}")


def _variant_names(method: str) -> set[str]:
    """The method's variants, counted ones by name alone (``calib128`` -> ``calib``)."""
    names = set()
    for variant in method.split("-")[1:]:
        stem = re.sub(r"\d+$", "", variant)
        names.add(stem if stem in COUNTED else variant)
    return names


def plan_file(args, method: str, keep: float) -> Path | None:
    """The committed plan of the method's allocator at ``keep`` under ``--plans``, if there is one
    (``ara-seq`` applies the ``ara`` plan: the variant changes the factors, not the ranks; ``ara-mix``
    runs ARA again, on the windows the variant gives it)."""
    if not args.plans or RANK_VARIANTS & _variant_names(method):
        return None
    path = args.plans / f"{Path(args.model).stem}_{method.partition('-')[0]}_keep{keep}.json"
    return path if path.is_file() else None


def compress_command(args, method: str, keep: float, out: Path) -> list[str]:
    allocator, *variants = method.split("-")
    extra = [arg for variant in variants for arg in variant_args(variant, method)]
    command = [*CLI, "compress", "--model", args.model, "--keep", str(keep), "--out", str(out)]
    plan = plan_file(args, method, keep)
    command += ["--plan", str(plan)] if plan else ["--method", allocator]
    return command + extra + (["--calib-file", args.calib_file] if args.calib_file else [])


def plan_summary(checkpoint: Path) -> dict:
    """Mean rank per layer type (last name component) and dense-layer count of a checkpoint."""
    plan = json.loads((checkpoint / "rank_plan.json").read_text())
    ranks: dict[str, list[int]] = {}
    for layer in plan["layers"]:
        if layer["rank"] is not None:
            ranks.setdefault(layer["name"].rsplit(".", 1)[-1], []).append(layer["rank"])
    return {"dense_layers": sum(layer["rank"] is None for layer in plan["layers"]),
            "keep_achieved": plan["keep_achieved"],
            "mean_rank_by_type": {kind: round(sum(v) / len(v), 1) for kind, v in ranks.items()}}


def compress_seconds(stdout: str) -> dict:
    """Wall times from ``compress``'s summary line: the whole command, and the allocator's and
    healing's shares (absent with ``--plan``, or without healing)."""
    found = {"compress_seconds": re.search(r"compressed .* in ([0-9.]+) s", stdout),
             "allocation_seconds": re.search(r"allocation ([0-9.]+) s", stdout),
             "compensation_seconds": re.search(r"compensation ([0-9.]+) s", stdout),
             "healing_seconds": re.search(r"healing ([0-9.]+) s", stdout)}
    return {key: float(match.group(1)) if match else None for key, match in found.items()}


def eval_command(args, model: str) -> list[str]:
    return [*CLI, "eval", model, "--text-file", args.text_file, "--seq-len", str(args.seq_len),
            "--max-windows", str(args.max_windows), "--json"]


def _run(command: list[str], dry_run: bool) -> str:
    print("+", shlex.join(command), flush=True)
    if dry_run:
        return ""
    runnable = [sys.executable, "-m", "lowrank_infer.cli", *command[len(CLI):]]
    return subprocess.run(runnable, check=True, stdout=subprocess.PIPE, text=True).stdout


def _perplexity(stdout: str) -> dict:
    """The JSON object that ``eval --json`` prints (after any other output)."""
    return json.loads(stdout[stdout.index("{"):])


def _evaluate(args, method: str, keep: float, model: str, before: list[list[str]]) -> dict:
    command = eval_command(args, model)
    stdout = _run(command, args.dry_run)
    return {"method": method, "keep": keep, "commands": [*before, command], **(_perplexity(stdout) if stdout else {})}


def run_grid(args) -> list[dict]:
    """The dense row, then one row per (method, keep); finished checkpoints are not recompressed."""
    rows = [_evaluate(args, "dense", 1.0, args.model, [])] if not args.no_dense else []
    for method in args.methods:
        for keep in args.keeps:
            out = args.work_dir / f"{Path(args.model).stem}-{method}-{keep}"
            made, seconds = [], {}
            if not is_compressed_checkpoint(out):
                made = [compress_command(args, method, keep, out)]
                seconds = compress_seconds(_run(made[0], args.dry_run))
            row = _evaluate(args, method, keep, str(out), made)
            if not args.dry_run:
                row.update(plan_summary(out), **seconds)
                _save_plan(args, out, method, keep)
            rows.append(row)
    return rows


def _save_plan(args, checkpoint: Path, method: str, keep: float) -> None:
    """Copy the checkpoint's plan to ``--save-plans`` under the name ``--plans`` reads."""
    if args.save_plans and "-" not in method:
        text = (checkpoint / "rank_plan.json").read_text()
        atomic_write_text(args.save_plans / f"{Path(args.model).stem}_{method}_keep{keep}.json", text)


def combine(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """Rows and suite commands of several result files, in order (for suites run in parallel)."""
    documents = [json.loads(path.read_text()) for path in paths]
    return [row for doc in documents for row in doc["rows"]], [doc["command"] for doc in documents]


_COLUMNS = [("method", "method", str), ("keep", "keep", str), ("perplexity", "perplexity", lambda v: f"{v:.3f}"),
            ("keep achieved", "keep_achieved", lambda v: f"{v:.4f}"), ("dense layers", "dense_layers", str),
            ("allocation s", "allocation_seconds", lambda v: f"{v:.1f}"),
            ("compensation s", "compensation_seconds", lambda v: f"{v:.1f}"),
            ("healing s", "healing_seconds", lambda v: f"{v:.1f}"), ("compress s", "compress_seconds", lambda v: f"{v:.1f}"),
            ("mean rank by type", "mean_rank_by_type", lambda v: ", ".join(f"{k} {r:g}" for k, r in v.items())),
            ("windows", "windows", str), ("seq len", "seq_len", str)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, model directory or hub id")
    parser.add_argument("--methods", nargs="+", default=["uniform", "drank", "ara"])
    parser.add_argument("--keeps", nargs="+", type=float, default=[0.4, 0.6, 0.8])
    parser.add_argument("--text-file", help="evaluation text (e.g. WikiText-2 test.raw.txt); required to run")
    parser.add_argument("--calib-file", help="calibration text passed to compress (default: compress's)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--work-dir", type=Path, default=Path("quality-checkpoints"), help="compressed models")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "quality.json", help="JSON; .md beside it")
    parser.add_argument("--plans", type=Path, help="apply <model>_<method>_keep<keep>.json plans from here")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row")
    parser.add_argument("--save-plans", type=Path, help="copy each checkpoint's rank plan here")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                        help="write one table from earlier result files instead of running anything")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    commands = [shlex.join(["python", *sys.argv])]
    if args.combine:
        rows, suites = combine(args.combine)
        commands = [*suites, *commands]  # in the order they ran: the suites, then this combination
    elif not args.text_file:
        parser.error("--text-file is required unless --combine is given")
    else:
        rows = run_grid(args)
    if args.dry_run:
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    document = {"benchmark": "quality", "command": " && ".join(commands), "environment": environment(device),
                "model": args.model, "text_file": args.text_file, "rows": rows}
    table = f"## Perplexity of {args.model} ({args.seq_len}-token windows)\n\n" + markdown_table(rows, _COLUMNS)
    table += (
        "\nMean rank by type counts low-rank layers only (a type whose layers are all dense is absent); "
        "allocation, compensation (with refinement), healing and compress s (wall times on this machine) are '-' where a finished checkpoint was reused "
        "or the stage did not run. Every row's compress and eval "
        f"commands are in {args.out.name}; made by: `{document['command']}`\n"
    )
    print(table)
    atomic_write_text(args.out, json.dumps(document, indent=1) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
