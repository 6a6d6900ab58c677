"""Uniform allocation: every target linear keeps the same fraction of its parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

from lowrank_infer.allocation.budget import KEEP_TOLERANCE, fit_budget, spectra_shapes
from lowrank_infer.allocation.config import AllocationInputs, MethodConfig
from lowrank_infer.allocation.plan import RankPlan, check_keep, plan_from_ranks
from lowrank_infer.cost import layer_params

__all__ = ["UniformConfig", "uniform_plan", "uniform_rank"]


@dataclass(frozen=True)
class UniformConfig(MethodConfig):
    """Uniform allocation: every target linear keeps the same fraction of its parameters."""

    name: ClassVar[str] = "uniform"

    def allocate(self, inputs: AllocationInputs) -> RankPlan:
        return uniform_plan(spectra_shapes(inputs.spectra), self.keep, model=inputs.model_id,
                            multiple_of=self.multiple_of)


def uniform_rank(out_features: int, in_features: int, keep: float) -> int:
    """``floor(keep·m·n/(m+n))``: the rank that keeps ``keep`` of an ``m×n`` layer, rounded down."""
    return int(keep * out_features * in_features // (out_features + in_features))


def uniform_plan(
    shapes: Mapping[str, tuple[int, int]], keep: float, *, model: str = "", multiple_of: int = 1
) -> RankPlan:
    """``k = floor(keep·m·n/(m+n))`` for each layer (name → (out_features, in_features)).

    A layer whose rank reaches break-even stays dense, and ``keep = 1`` keeps every layer dense
    (a rank just under break-even would save almost nothing and lose accuracy). With
    ``multiple_of > 1`` the ranks are snapped to multiples of it and the budget is repaired
    greedily, evening out the kept fraction of the layers. The same repair runs when rounding
    alone misses the target by more than the tolerance (layers so small that one rank is a
    large share of them).

    Raises:
        PlanError: no plan with these layers comes within the tolerance of ``keep``.
    """
    keep = check_keep(keep)
    ranks = {name: None if keep == 1.0 else uniform_rank(m, n, keep) for name, (m, n) in shapes.items()}
    plan = plan_from_ranks(shapes, ranks, keep=keep, method="uniform", model=model)
    if keep < 1.0 and (multiple_of > 1 or not _within_budget(plan)):
        def value(name: str, rank: int | None) -> float:
            # m·n·log(kept fraction): a step's gain per parameter is 1 / (kept fraction), so the
            # greedy repair always grows the layer that keeps the least: fractions even out.
            m, n = shapes[name]
            return m * n * math.log(layer_params(m, n, rank) / (m * n))

        ranks = fit_budget(shapes, ranks, keep, value, multiple_of=multiple_of)
        params = {"multiple_of": multiple_of} if multiple_of > 1 else {}
        plan = plan_from_ranks(shapes, ranks, keep=keep, method="uniform", model=model, params=params)
    return plan


def _within_budget(plan: RankPlan) -> bool:
    return plan.keep_target - KEEP_TOLERANCE <= plan.keep_achieved <= plan.keep_target
