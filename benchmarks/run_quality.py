"""Quality suite: perplexity of methods × keep values, from the ``lowrank-infer`` CLI itself.

For every method and keep it runs ``lowrank-infer compress`` into ``--work-dir`` (a finished
checkpoint there is reused, so an interrupted suite resumes) and ``lowrank-infer eval --json``
on it, plus one eval of the dense model, and writes a perplexity table as markdown and JSON
(with machine, versions, the suite's command and every command it ran).

    python benchmarks/run_quality.py --model smollm2-135m --text-file test.raw.txt --calib-file valid.txt
    python benchmarks/run_quality.py --methods uniform drank --keeps 0.6 0.8 --dry-run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from lowrank_infer.allocation.plan import atomic_write_text
from lowrank_infer.bench.output import command_line, environment, markdown_table
from lowrank_infer.io import is_compressed_checkpoint

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "lowrank_infer.cli"]


def compress_command(args, method: str, keep: float, out: Path) -> list[str]:
    command = [*CLI, "compress", "--model", args.model, "--keep", str(keep), "--method", method, "--out", str(out)]
    return command + (["--calib-file", args.calib_file] if args.calib_file else [])


def eval_command(args, model: str) -> list[str]:
    return [*CLI, "eval", model, "--text-file", args.text_file, "--seq-len", str(args.seq_len),
            "--max-windows", str(args.max_windows), "--json"]


def _run(command: list[str], dry_run: bool) -> str:
    print("+", " ".join(command), flush=True)
    if dry_run:
        return ""
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def _perplexity(stdout: str) -> dict:
    """The JSON object that ``eval --json`` prints (after any other output)."""
    return json.loads(stdout[stdout.index("{"):])


def _evaluate(args, method: str, keep: float, model: str, before: list[list[str]]) -> dict:
    command = eval_command(args, model)
    stdout = _run(command, args.dry_run)
    return {"method": method, "keep": keep, "commands": [*before, command], **(_perplexity(stdout) if stdout else {})}


def run_grid(args) -> list[dict]:
    """The dense row, then one row per (method, keep); finished checkpoints are not recompressed."""
    rows = [_evaluate(args, "dense", 1.0, args.model, [])]
    for method in args.methods:
        for keep in args.keeps:
            out = args.work_dir / f"{Path(args.model).stem}-{method}-{keep}"
            made = []
            if not is_compressed_checkpoint(out):
                made = [compress_command(args, method, keep, out)]
                _run(made[0], args.dry_run)
            rows.append(_evaluate(args, method, keep, str(out), made))
    return rows


_COLUMNS = [("method", "method", str), ("keep", "keep", str), ("perplexity", "perplexity", lambda v: f"{v:.3f}"),
            ("windows", "windows", str), ("seq len", "seq_len", str)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, model directory or hub id")
    parser.add_argument("--methods", nargs="+", default=["uniform", "drank", "ara"])
    parser.add_argument("--keeps", nargs="+", type=float, default=[0.4, 0.6, 0.8])
    parser.add_argument("--text-file", required=True, help="evaluation text (e.g. WikiText-2 test.raw.txt)")
    parser.add_argument("--calib-file", help="calibration text passed to compress (default: compress's)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--work-dir", type=Path, default=Path("quality-checkpoints"), help="compressed models")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "quality.json", help="JSON; .md beside it")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    rows = run_grid(args)
    if args.dry_run:
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    document = {"benchmark": "quality", "command": command_line(), "environment": environment(device),
                "model": args.model, "text_file": args.text_file, "rows": rows}
    table = f"## Perplexity of {args.model} ({args.seq_len}-token windows)\n\n" + markdown_table(rows, _COLUMNS)
    print(table)
    atomic_write_text(args.out, json.dumps(document, indent=1) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
