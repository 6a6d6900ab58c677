"""Eager per-call Python overhead of ``LowRankLinear`` on the CPU.

A decode step calls every layer once per token, so microseconds of Python per call add up to
milliseconds per token in eager mode. This times ``LowRankLinear.forward`` on a tiny layer,
where the math takes almost nothing, beside the bare math (``torch_lowrank_linear``) and
``nn.Linear``, in one run; the difference is what the layer adds on top of its arithmetic.

    python benchmarks/layer_overhead.py --json benchmarks/results/layer_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import timeit

import torch
from torch import nn

from lowrank_infer import LowRankLinear
from lowrank_infer.kernels import torch_lowrank_linear


def _per_call_us(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of one call, in microseconds."""
    times = timeit.repeat(fn, number=calls, repeat=repeats)
    return statistics.median(times) / calls * 1e6


def measure(m: int = 64, n: int = 64, k: int = 16, calls: int = 2000, repeats: int = 15) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(1, n)
    U, V, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(m)
    layer = LowRankLinear.from_factors(U, V, bias).eval()
    dense = nn.Linear(n, m).eval()
    with torch.no_grad():
        rows = {
            "LowRankLinear": _per_call_us(lambda: layer(x), calls, repeats),
            "torch_lowrank_linear (math only)": _per_call_us(lambda: torch_lowrank_linear(x, U, V, bias), calls, repeats),
            "nn.Linear": _per_call_us(lambda: dense(x), calls, repeats),
        }
    rows["overhead of LowRankLinear over its math"] = rows["LowRankLinear"] - rows["torch_lowrank_linear (math only)"]
    return {"shape": {"T": 1, "m": m, "n": n, "k": k}, "us_per_call": rows,
            "torch": torch.__version__, "python": platform.python_version(), "threads": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = measure()
    result["command"] = "python benchmarks/layer_overhead.py" + (f" --json {args.json}" if args.json else "")
    for name, us in result["us_per_call"].items():
        print(f"{name:42s} {us:8.2f} us/call")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
