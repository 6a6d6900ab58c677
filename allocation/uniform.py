"""Uniform allocation: every target linear keeps the same fraction of its parameters."""

from __future__ import annotations

from typing import Mapping

from lowrank_infer.allocation.plan import RankPlan, check_keep, plan_from_ranks

__all__ = ["uniform_plan"]


def uniform_plan(shapes: Mapping[str, tuple[int, int]], keep: float, *, model: str = "") -> RankPlan:
    """``k = floor(keep·m·n/(m+n))`` for each layer (name → (out_features, in_features)).

    A layer whose rank reaches break-even (always the case at ``keep = 1``) stays dense.
    """
    keep = check_keep(keep)
    ranks = {name: int(keep * m * n // (m + n)) for name, (m, n) in shapes.items()}
    return plan_from_ranks(shapes, ranks, keep=keep, method="uniform", model=model)
