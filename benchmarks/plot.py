"""PNG plots of a ``lowrank-infer bench kernels`` JSON: speedup over dense vs keep and vs tokens.

Each point is the geometric mean, over the selected models' layer shapes, of a low-rank
provider's speedup over dense ``F.linear`` on the same shape and token count.

    python benchmarks/plot.py benchmarks/results/kernels-NVIDIA_H100_80GB_HBM3.json
    python benchmarks/plot.py kernels.json --models llama2-7b --out-dir plots/
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def speedups(rows: list[dict], provider: str) -> dict[tuple[float, int], float]:
    """``(keep, tokens) -> geometric-mean speedup`` of ``provider`` over its successful rows."""
    logs = defaultdict(list)
    for row in rows:
        if row["provider"] == provider and row.get("speedup_vs_dense"):
            logs[(row["keep"], row["tokens"])].append(math.log(row["speedup_vs_dense"]))
    return {key: math.exp(sum(values) / len(values)) for key, values in logs.items()}


def _figure(providers: list[str], title: str):
    fig, axes = plt.subplots(1, len(providers), figsize=(5 * len(providers), 4), squeeze=False, sharey=True,
                             layout="constrained")
    fig.suptitle(title)
    return fig, axes[0]


def plot_vs_keep(rows: list[dict], providers: list[str], title: str, path: Path) -> None:
    """Speedup against keep, one line per token count, one panel per provider."""
    fig, axes = _figure(providers, title)
    for ax, provider in zip(axes, providers):
        points = speedups(rows, provider)
        for tokens in sorted({t for _, t in points}):
            keeps = sorted(k for k, t in points if t == tokens)
            ax.plot(keeps, [points[(k, tokens)] for k in keeps], marker="o", label=f"T={tokens}")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set(title=provider, xlabel="keep (fraction of parameters)", ylabel="speedup over dense")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_vs_tokens(rows: list[dict], providers: list[str], title: str, path: Path) -> None:
    """Speedup against token count (log scale), one line per keep, one panel per provider."""
    fig, axes = _figure(providers, title)
    for ax, provider in zip(axes, providers):
        points = speedups(rows, provider)
        for keep in sorted({k for k, _ in points}):
            tokens = sorted(t for k, t in points if k == keep)
            ax.plot(tokens, [points[(keep, t)] for t in tokens], marker="o", label=f"keep {keep}")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set(title=provider, xlabel="tokens (T)", ylabel="speedup over dense")
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
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["k"] is not None and r.get("speedup_vs_dense")))
    if not providers:
        raise SystemExit(f"{args.json}: no low-rank rows with a speedup over dense to plot")
    out_dir = args.out_dir or args.json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    models = ", ".join(args.models or sorted({r["model"] for r in rows}))
    title = f"{document['environment']['device_label']}, {document['dtype']}: {models}"
    paths = [out_dir / f"{args.json.stem}-vs-keep.png", out_dir / f"{args.json.stem}-vs-tokens.png"]
    plot_vs_keep(rows, providers, title, paths[0])
    plot_vs_tokens(rows, providers, title, paths[1])
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
