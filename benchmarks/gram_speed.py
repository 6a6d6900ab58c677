"""Seconds for the float64 ``XᵀX`` that calibration accumulates, side by side in one process: the
plain product ``x.T @ x`` against :func:`lowrank_infer.calibration.symmetric_gram` (the upper
triangle a band of rows at a time, mirrored) at 2, 4 and 8 bands, with the largest difference
from the plain product.

The default shapes are SmolLM2-135M's in ``make demo``: one batch of 32 windows of 512 tokens,
576 features (q/k/v, o, gate/up inputs) and 1536 (down_proj's input).

usage: python benchmarks/gram_speed.py [--tokens 16384] [--features 576 1536] [--rounds 5]
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

from lowrank_infer.bench.output import environment
from lowrank_infer.calibration import _GRAM_BANDS, symmetric_gram

BANDS = (2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--features", type=int, nargs="+", default=[576, 1536])
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each way, alternating (medians reported)")
    args = parser.parse_args()
    print("command: python benchmarks/gram_speed.py " + shlex.join(sys.argv[1:]))
    print(f"machine: {environment(torch.device('cpu'))['device_label']}, {torch.get_num_threads()} threads; "
          f"default bands: {_GRAM_BANDS}")
    for n in args.features:
        x = torch.randn(args.tokens, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        plain = x.T @ x
        ways = {"plain": lambda: x.T @ x} | {f"{b} bands": (lambda b=b: symmetric_gram(x, b)) for b in BANDS}
        times = {name: [] for name in ways}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, run in ways.items():
                began = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - began)
        median = {name: statistics.median(t[1:]) for name, t in times.items()}
        line = ", ".join(f"{name} {median[name]:.3f} s ({median['plain'] / median[name]:.2f}x)" for name in ways)
        diff = max(float((symmetric_gram(x, b) - plain).abs().max() / plain.abs().max()) for b in BANDS)
        print(f"[{args.tokens}, {n}] float64: {line}; largest difference from plain, relative: {diff:.1e}")


if __name__ == "__main__":
    main()
