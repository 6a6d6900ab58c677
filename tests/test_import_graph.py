"""Imports flow one way: no pipeline stage imports a later one (see design.md, "Data flow")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folders and the package each is installed as (pyproject.toml's package-dir).
PACKAGES = {"lowrank_infer": "lowrank_infer", "kernels": "lowrank_infer.kernels", "allocation": "lowrank_infer.allocation"}

# Leaves may be imported by anything and import only leaves: the kernels (the op every stage
# runs), the parameter-cost rule, the plan format, model structure, atomic files, the
# process group, weights kept on disk, early-stopped training, the compute dtype and the attention
# of the passes that run under it.
LEAVES = ("lowrank_infer.kernels", "lowrank_infer.cost", "lowrank_infer.allocation.plan", "lowrank_infer.structure",
          "lowrank_infer.atomic", "lowrank_infer.distributed", "lowrank_infer.offload", "lowrank_infer.training",
          "lowrank_infer.precision", "lowrank_infer.cpu_attention")
# The pipeline in data-flow order; a stage may import leaves, itself and earlier stages.
# Everything else (compress, evaluate, data, models, the CLI, bench, the package root)
# orchestrates and may import anything.
STAGES = (
    ("lowrank_infer.calibration",),
    ("lowrank_infer.factorize", "lowrank_infer.spectra", "lowrank_infer.workdir"),
    ("lowrank_infer.allocation",),
    ("lowrank_infer.compensation", "lowrank_infer.refinement"),
    ("lowrank_infer.module", "lowrank_infer.surgery", "lowrank_infer.healing", "lowrank_infer.healing_loss"),
    ("lowrank_infer.io", "lowrank_infer.hf_quantizer", "lowrank_infer.report", "lowrank_infer.packing"),
)


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _level(module: str) -> float:
    """-1 for a leaf, the stage index for a stage, infinity for orchestration."""
    if _within(module, LEAVES):
        return -1
    for index, stage in enumerate(STAGES):
        if _within(module, stage):
            return index
    return float("inf")


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every ``lowrank_infer`` module imported anywhere in the file (function-local ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if _within(name, ("lowrank_infer",))}


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _level(m) != float("inf")))
def test_no_module_imports_a_later_stage(module):
    level = _level(module)
    later = sorted(name for name in _imports(MODULES[module]) if _level(name) > level)
    assert not later, f"{module} (level {level}) imports later stages: {later}"


def test_every_stage_and_leaf_exists():
    for name in (*LEAVES, *(m for stage in STAGES for m in stage)):
        assert name in MODULES, f"{name} is named in the import rules but does not exist"
