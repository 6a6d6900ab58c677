"""Benchmark documents: the environment they were measured in, speedups, JSON files and markdown tables."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import sys
from typing import Callable

import torch

from lowrank_infer.atomic import atomic_write_text

__all__ = ["Column", "add_speedups", "command_line", "cpu_model", "environment", "markdown_table", "write_outputs"]

# (header, row key, format of a present value); a missing value prints as "-".
Column = tuple[str, str, Callable[[object], str]]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux's ``cpuinfo``), else what :mod:`platform` knows (often only
    ``x86_64``): CPU wall times are only comparable on the same model."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Machine, GPU and library versions, so that a result file says where it came from.

    ``device_label`` is the GPU's name, or ``"CPU (<processor>)"``.
    """
    info = {
        "host": platform.node(), "platform": platform.platform(),
        "processor": cpu_model(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": _version("triton"), "transformers": _version("transformers"),
        "lowrank_infer": _version("lowrank-infer"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_sms=props.multi_processor_count, gpu_memory_bytes=props.total_memory,
                    device_label=props.name)
    else:
        info["device_label"] = f"CPU ({info['processor']})"
    return info


def command_line() -> str:
    """The command this process was started with, interpreter and ``-m`` included, quoted for a shell."""
    return shlex.join(sys.orig_argv)


def add_speedups(rows: list[dict], case: tuple[str, ...]) -> None:
    """Set ``speedup_vs_dense`` = dense time / row time on every row whose dense case (the
    row with the same ``case`` fields and backend ``dense``) was timed; else None."""
    dense_ms = {tuple(r[key] for key in case): r["median_ms"] for r in rows if r["backend"] == "dense"}
    for row in rows:
        base = dense_ms.get(tuple(row[key] for key in case))
        row["speedup_vs_dense"] = base / row["median_ms"] if base and row["median_ms"] else None


def _cell(row: dict, key: str, fmt: Callable[[object], str]) -> str:
    value = row.get(key)
    return "-" if value is None else fmt(value)


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    """A GitHub markdown table of ``rows``, one column per ``(header, key, format)``."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(document: dict, markdown: str, json_path: str | None, markdown_path: str | None,
                  echo: bool = True) -> None:
    """Print ``markdown`` (if ``echo``) and write the files asked for (each written whole, then renamed)."""
    if echo:
        print(markdown, flush=True)
    if json_path:
        atomic_write_text(json_path, json.dumps(document, indent=1) + "\n")
    if markdown_path:
        atomic_write_text(markdown_path, markdown + "\n")
