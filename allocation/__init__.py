"""Rank allocation under a global parameter budget (imported as ``lowrank_infer.allocation``)."""

from lowrank_infer.allocation.plan import (
    FORMAT_VERSION,
    LayerRank,
    PlanError,
    RankPlan,
    check_keep,
    layer_params,
    max_useful_rank,
    plan_from_ranks,
)
from lowrank_infer.allocation.uniform import uniform_plan
from lowrank_infer.allocation.drank import drank_plan, effective_rank
from lowrank_infer.allocation.ara import ARATrainingError, ara_plan

__all__ = [
    "ARATrainingError",
    "FORMAT_VERSION",
    "LayerRank",
    "PlanError",
    "RankPlan",
    "ara_plan",
    "check_keep",
    "drank_plan",
    "effective_rank",
    "layer_params",
    "max_useful_rank",
    "plan_from_ranks",
    "uniform_plan",
]
