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
from lowrank_infer.allocation.uniform import uniform_plan, uniform_rank
from lowrank_infer.allocation.drank import drank_plan, effective_rank
from lowrank_infer.allocation.ara import ARATrainingError, ara_plan
from lowrank_infer.allocation.drank_beta import BETA_CANDIDATES, calibration_loss, drank_auto_plan

__all__ = [
    "ARATrainingError",
    "BETA_CANDIDATES",
    "FORMAT_VERSION",
    "LayerRank",
    "PlanError",
    "RankPlan",
    "ara_plan",
    "calibration_loss",
    "check_keep",
    "drank_auto_plan",
    "drank_plan",
    "effective_rank",
    "layer_params",
    "max_useful_rank",
    "plan_from_ranks",
    "uniform_plan",
    "uniform_rank",
]
