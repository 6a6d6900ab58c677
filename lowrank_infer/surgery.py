"""Swap a model's planned target linears for ``LowRankLinear`` and back."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

import lowrank_infer.offload as offload
from lowrank_infer.allocation.plan import RankPlan
from lowrank_infer.module import LowRankLinear
from lowrank_infer.structure import replace_module, target_linears

__all__ = ["apply_plan", "build_lowrank_skeleton", "check_uncompressed", "dequantize", "plan_applied"]


def check_uncompressed(model: nn.Module) -> None:
    """Refuse a model that already holds ``LowRankLinear`` layers (compress the dense original)."""
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            raise ValueError(f"the model is already compressed ({name} is a LowRankLinear): "
                             "compress the dense original")


def _lowrank_targets(model: nn.Module, plan: RankPlan):
    """``(plan layer, nn.Linear)`` of each low-rank layer, after validating the whole plan
    against the target linears (the LM head and embeddings are never targets)."""
    check_uncompressed(model)
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
        if linear.weight.is_meta and offload.holds(linear):
            offload.load(linear, "cpu")  # its bias (and, briefly, its weight) from disk
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


def dequantize(model: nn.Module) -> nn.Module:
    """Turn every ``LowRankLinear`` back into an ``nn.Linear`` (``U @ V.T`` when low-rank), in place.

    The result is an ordinary dense model of the same architecture; the rank plan it carried
    is dropped from its config.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            weight = module.dense_weight().detach()
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            replace_module(model, name, linear)
    config = getattr(model, "config", None)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return model
