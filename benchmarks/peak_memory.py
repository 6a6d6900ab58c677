"""Peak host memory (max RSS, from ``/usr/bin/time -v``) of ``lowrank-infer compress`` on SmolLM2.

Each variant runs in its own process; the result goes to a JSON file with the commands. To
compare with an older version of the package, install it in another environment and pass its
interpreter as ``--before-python``.

    python benchmarks/peak_memory.py --calib-file ../shared/data/wikitext2/valid.tokens.txt \\
        --before-python /tmp/oldvenv/bin/python --out benchmarks/results/cpu/peak_memory_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss(command: list[str], cwd: Path) -> tuple[float, float]:
    """``(max RSS in MiB, wall seconds)`` of ``command``; raises when it fails."""
    start = time.perf_counter()
    # Run outside any checkout: ``python -m`` would import a ``lowrank_infer`` folder in the cwd.
    run = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    return kib / 1024, seconds


def _portable(command: list[str], scratch: Path, before: str | None) -> str:
    """The command as a user would type it: no interpreter or temporary paths of this machine."""
    names = {sys.executable: "python", before: "OLD_ENV/bin/python"}
    words = [names.get(word, word) for word in command]
    return " ".join(word.split("/")[-1].split("-")[0].upper() if word.startswith(f"{scratch}/") else word
                    for word in words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-file", required=True)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--methods", default="uniform,drank")
    p.add_argument("--before-python", help="interpreter of an environment with the older package")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="peak-memory-"))
    variants = []
    for method in args.methods.split(","):
        base = ["-m", "lowrank_infer.cli", "compress", "--model", "smollm2-135m", "--keep", "0.8", "--method", method,
                "--calib-file", args.calib_file, "--calib-samples", str(args.calib_samples),
                "--seq-len", str(args.seq_len), "--overwrite"]
        if args.before_python:
            variants.append((f"{method}, before (all statistics first)", [args.before_python, *base]))
        variants.append((f"{method}, streaming, spectra in memory", [sys.executable, *base]))
        variants.append((f"{method}, streaming, --work-dir", [sys.executable, *base, "--work-dir", "WORK"]))
        variants.append((f"{method}, streaming, --work-dir --weights-on-disk",
                         [sys.executable, *base, "--work-dir", "WORK", "--weights-on-disk"]))
    rows = []
    for label, command in variants:
        work = scratch / f"work-{len(rows)}"
        command = [str(work) if c == "WORK" else c for c in command] + ["--out", str(scratch / f"out-{len(rows)}")]
        mib, seconds = _peak_rss(command, scratch)
        shutil.rmtree(work, ignore_errors=True)
        rows.append({"variant": label, "peak_rss_mib": round(mib, 1), "wall_s": round(seconds, 1),
                     "command": _portable(command, scratch, args.before_python)})
        print(f"{label:48s} {mib:8.1f} MiB {seconds:7.1f} s", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    result = {"machine": "CPU, 2 cores (shared), float32 SmolLM2-135M-Instruct (GGUF)", "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
