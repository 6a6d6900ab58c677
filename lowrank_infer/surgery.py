"""Find a decoder-only model's target linears and swap them for ``LowRankLinear``."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from lowrank_infer.allocation import RankPlan
from lowrank_infer.module import LowRankLinear

__all__ = [
    "apply_plan",
    "build_lowrank_skeleton",
    "decoder_blocks",
    "plan_applied",
    "replace_module",
    "target_linears",
    "target_shapes",
]


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "num_hidden_layers", None)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks and its qualified name.

    Looks for a ``ModuleList`` as long as ``config.num_hidden_layers`` (every HF decoder-only
    architecture stores its blocks so: ``model.layers``, ``transformer.h`` …); without a config,
    the longest ``ModuleList`` that holds linears.
    """
    wanted = _num_layers(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
        and any(isinstance(m, (nn.Linear, LowRankLinear)) for m in module.modules())
    ]
    exact = [c for c in candidates if len(c[1]) == wanted]
    if exact:
        return exact[0]
    if candidates:
        return max(candidates, key=lambda c: len(c[1]))
    raise ValueError(f"{type(model).__name__}: found no list of decoder blocks containing nn.Linear layers")


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
    """
    prefix, blocks = decoder_blocks(model)
    inc, exc = _compile(include), _compile(exclude)
    found = {}
    for name, module in blocks.named_modules():
        full = f"{prefix}.{name}"
        if isinstance(module, LowRankLinear):
            raise ValueError(f"the model is already compressed ({full} is a LowRankLinear): "
                             "compress the dense original")
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


def _lowrank_targets(model: nn.Module, plan: RankPlan):
    """``(plan layer, nn.Linear)`` of each low-rank layer, after validating the whole plan
    against the target linears (the LM head and embeddings are never targets)."""
    linears = target_linears(model)
    plan.validate({name: (m.out_features, m.in_features) for name, m in linears.items()})
    return [(layer, linears[layer.name]) for layer in plan.layers if layer.rank is not None]


def apply_plan(
    model: nn.Module,
    plan: RankPlan,
    factors: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]],
) -> nn.Module:
    """Swap each low-rank planned linear for a ``LowRankLinear``, in place; dense ones stay as they are.

    Args:
        plan: ranks per layer; validated against the model first.
        factors: ``(name, rank) -> (U, V)``, e.g. from a layer's :class:`Spectrum`.
    """
    _swap_in(model, _lowrank_targets(model, plan), factors)
    return model


def _swap_in(model: nn.Module, targets, factors) -> None:
    for layer, linear in targets:
        weight = linear.weight
        U, V = factors(layer.name, layer.rank)
        want = ((layer.out_features, layer.rank), (layer.in_features, layer.rank))
        if (tuple(U.shape), tuple(V.shape)) != want:
            raise ValueError(f"factors for {layer.name!r} are U {tuple(U.shape)}, V {tuple(V.shape)}; "
                             f"its plan needs U {want[0]}, V {want[1]}")
        new = LowRankLinear.from_factors(
            U.to(weight.device, weight.dtype), V.to(weight.device, weight.dtype), linear.bias
        )
        replace_module(model, layer.name, new)


@contextmanager
def plan_applied(
    model: nn.Module,
    plan: RankPlan,
    factors: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[nn.Module]:
    """:func:`apply_plan` for the duration of a ``with`` block; the original linears come back after.

    Lets an allocator score candidate plans on the real model without copying it.
    """
    targets = _lowrank_targets(model, plan)
    try:
        _swap_in(model, targets, factors)
        yield model
    finally:
        for layer, linear in targets:
            replace_module(model, layer.name, linear)


def build_lowrank_skeleton(model: nn.Module, plan: RankPlan, dtype: torch.dtype | None = None) -> nn.Module:
    """Swap planned linears for empty ``LowRankLinear``s on the ``meta`` device (before loading).

    No dense weight is materialized for a low-rank layer: the checkpoint's ``U``/``V`` are
    assigned straight into these modules.
    """
    for layer, linear in _lowrank_targets(model, plan):
        new = LowRankLinear(
            layer.in_features, layer.out_features, layer.rank, bias=linear.bias is not None,
            device="meta", dtype=dtype or linear.weight.dtype,
        )
        replace_module(model, layer.name, new)
    return model
