"""Where a decoder-only model keeps its blocks and target linears, and how to swap a module.

A leaf of the pipeline: every stage (calibration, allocation, surgery, the pipeline itself)
reads model structure through these few functions, and they import nothing of the package.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

__all__ = ["decoder_blocks", "replace_module", "target_linears", "target_shapes"]


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "num_hidden_layers", None)


def _holds_weights(module: nn.Module) -> bool:
    return any(p.ndim == 2 for p in module.parameters())


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks and its qualified name.

    Looks for a ``ModuleList`` as long as ``config.num_hidden_layers`` (every HF decoder-only
    architecture stores its blocks so: ``model.layers``, ``transformer.h`` …); without a config,
    the longest ``ModuleList`` that holds weight matrices (dense or already factorized).
    """
    wanted = _num_layers(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and _holds_weights(module)
    ]
    exact = [c for c in candidates if len(c[1]) == wanted]
    if exact:
        return exact[0]
    if candidates:
        return max(candidates, key=lambda c: len(c[1]))
    raise ValueError(f"{type(model).__name__}: found no list of decoder blocks holding weight matrices")


def _compile(patterns: Iterable[str] | None) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in patterns or ()]
    except re.error as err:
        raise ValueError(f"bad include/exclude pattern: {err}") from None


def target_linears(
    model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder blocks, by qualified name, in model order.

    Args:
        include: regexes (``re.search``); when given, a layer must match one of them.
        exclude: regexes; a layer matching any of them is skipped.

    Raises:
        ValueError: a bad pattern, or no linear matched.
    """
    prefix, blocks = decoder_blocks(model)
    inc, exc = _compile(include), _compile(exclude)
    found = {}
    for name, module in blocks.named_modules():
        full = f"{prefix}.{name}"
        if not isinstance(module, nn.Linear):
            continue
        if inc and not any(p.search(full) for p in inc):
            continue
        if any(p.search(full) for p in exc):
            continue
        found[full] = module
    if not found:
        raise ValueError("no target linears matched (check --include / --exclude patterns)")
    return found


def target_shapes(model: nn.Module, **patterns) -> dict[str, tuple[int, int]]:
    """Name → ``(out_features, in_features)`` of the target linears."""
    return {name: (m.out_features, m.in_features) for name, m in target_linears(model, **patterns).items()}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
