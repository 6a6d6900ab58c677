"""PNG plots of a ``lowrank-infer bench kernels`` JSON: speedup over dense vs keep and vs tokens.

Each point is the geometric mean, over the selected models' layer shapes, of a low-rank
backend's speedup over dense ``F.linear`` on the same shape and token count. Files written
before the benches used the library's backends name them differently; they are read with
today's names (``lowrank_infer.bench.backend_of``).

    python benchmarks/plot.py benchmarks/results/h100/kernels-llama2-7b.json
    python benchmarks/plot.py kernels.json --models llama2-7b --out-dir plots/
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

from lowrank_infer.bench import backend_of

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

# x field -> (axis label, axis scale, label of one line: the other field's value)
_AXES = {"keep": ("keep (fraction of parameters)", "linear", "T={}"), "tokens": ("tokens (T)", "log", "keep {}")}


def speedups(rows: list[dict], backend: str) -> dict[tuple[float, int], float]:
    """``(keep, tokens) -> geometric-mean speedup`` of ``backend`` over its successful rows."""
    logs = defaultdict(list)
    for row in rows:
        if backend_of(row) == backend and row.get("speedup_vs_dense"):
            logs[(row["keep"], row["tokens"])].append(math.log(row["speedup_vs_dense"]))
    return {key: math.exp(sum(values) / len(values)) for key, values in logs.items()}


def plot_speedups(rows: list[dict], backends: list[str], title: str, path: Path, x: str) -> None:
    """Speedup against ``x`` (``"keep"`` or ``"tokens"``), one line per value of the other field,
    one panel per backend."""
    xlabel, scale, legend = _AXES[x]
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), squeeze=False, sharey=True,
                             layout="constrained")
    fig.suptitle(title)
    for ax, backend in zip(axes[0], backends):
        # (x value, line value) -> speedup
        points = {(key if x == "keep" else key[::-1]): s for key, s in speedups(rows, backend).items()}
        for line in sorted({line for _, line in points}):
            xs = sorted(v for v, other in points if other == line)
            ax.plot(xs, [points[(v, line)] for v in xs], marker="o", label=legend.format(line))
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale(scale, **({"base": 2} if scale == "log" else {}))
        ax.set(title=backend, xlabel=xlabel, ylabel="speedup over dense")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="output of 'lowrank-infer bench kernels --json'")
    parser.add_argument("--out-dir", type=Path, help="where the PNGs go (default: beside the JSON)")
    parser.add_argument("--models", nargs="+", help="only these models' shapes (default: all in the file)")
    args = parser.parse_args(argv)
    document = json.loads(args.json.read_text(encoding="utf-8"))
    rows = [r for r in document["rows"] if not args.models or r["model"] in args.models]
    backends = list(dict.fromkeys(backend_of(r) for r in rows if r["k"] is not None and r.get("speedup_vs_dense")))
    if not backends:
        raise SystemExit(f"{args.json}: no low-rank rows with a speedup over dense to plot")
    out_dir = args.out_dir or args.json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    models = ", ".join(args.models or sorted({r["model"] for r in rows}))
    title = f"{document['environment']['device_label']}, {document['dtype']}: {models}"
    paths = []
    for x in _AXES:
        paths.append(out_dir / f"{args.json.stem}-vs-{x}.png")
        plot_speedups(rows, backends, title, paths[-1], x)
        print(f"wrote {paths[-1]}")
    return paths


if __name__ == "__main__":
    main()
