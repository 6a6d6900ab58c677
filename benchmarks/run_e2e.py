"""Reproduce the README's end-to-end numbers: ``lowrank-infer bench e2e --shape-only`` per config.

Each config runs in its own process (so one failure or out-of-memory cannot spoil the next)
and writes ``e2e-<config>-<device>.json`` and ``.md`` into ``--out-dir``: prefill latency,
decode tokens/s and peak memory of the dense model and of random compressed models at each
keep, the Triton path vs two matmuls (cuBLAS). Any other flag is passed on to ``bench e2e``.

    python benchmarks/run_e2e.py                               # llama2-7b and llama3-8b
    python benchmarks/run_e2e.py --configs smollm2-135m --quick
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from run_kernels import HERE, device_slug

from lowrank_infer.bench.shapes import MODELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["llama2-7b", "llama3-8b"], help="built-in configs")
    parser.add_argument("--keep", nargs="+", default=["0.4", "0.6", "0.8"], help="kept fractions (default 0.4 0.6 0.8)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results", help="default benchmarks/results")
    args, bench_args = parser.parse_known_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for config in args.configs:
        name = config if config in MODELS else Path(config).stem  # a config.json path: its file name
        stem = args.out_dir / f"e2e-{name}-{device_slug()}{'-quick' if '--quick' in bench_args else ''}"
        command = [sys.executable, "-m", "lowrank_infer.bench", "e2e", "--shape-only", "--config", config,
                   "--keep", *args.keep, *bench_args, "--json", f"{stem}.json", "--markdown", f"{stem}.md"]
        print("+", " ".join(command), flush=True)
        if subprocess.run(command).returncode:
            failed.append(config)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
