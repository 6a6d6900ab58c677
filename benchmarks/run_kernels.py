"""Reproduce the README's kernel numbers: ``lowrank-infer bench kernels`` over the full grid, then plots.

Writes ``kernels-<device>.json`` (results, measured peaks, machine, versions, command), the
markdown table ``kernels-<device>.md`` and the PNG plots into ``--out-dir``. Any other flag is
passed on to ``bench kernels`` (e.g. ``--models llama2-7b --tokens 1 16``).

    python benchmarks/run_kernels.py                # full grid: a few minutes on an H100
    python benchmarks/run_kernels.py --quick        # smoke run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def device_slug() -> str:
    """The GPU's name (or ``cpu``) as a file-name fragment."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE / "results", help="default benchmarks/results")
    args, bench_args = parser.parse_known_args(argv)
    stem = args.out_dir / f"kernels-{device_slug()}{'-quick' if '--quick' in bench_args else ''}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lowrank_infer.bench", "kernels", *bench_args,
               "--json", f"{stem}.json", "--markdown", f"{stem}.md"]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    subprocess.run([sys.executable, str(HERE / "plot.py"), f"{stem}.json", "--out-dir", str(args.out_dir)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
