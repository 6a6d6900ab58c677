"""Rank allocation under a global parameter budget (imported as ``lowrank_infer.allocation``).

Each method is a config class (``UniformConfig``, ``DRankConfig``, ``ARAConfig``) whose
``allocate`` makes a :class:`RankPlan`; :data:`METHODS` finds them by name.
"""

from lowrank_infer.allocation.plan import FORMAT_VERSION, LayerRank, PlanError, RankPlan, check_keep, plan_from_ranks
from lowrank_infer.allocation.config import AllocationInputs, MethodConfig
from lowrank_infer.allocation.uniform import UniformConfig, uniform_plan, uniform_rank
from lowrank_infer.allocation.drank import DRankConfig, drank_plan, effective_rank
from lowrank_infer.allocation.ara import ARAConfig, ARATrainingError, ara_plan

# The registry: method name -> config class. A new method is its module plus one entry here.
METHODS = {config.name: config for config in (UniformConfig, DRankConfig, ARAConfig)}

__all__ = [
    "ARAConfig",
    "ARATrainingError",
    "AllocationInputs",
    "DRankConfig",
    "FORMAT_VERSION",
    "LayerRank",
    "METHODS",
    "MethodConfig",
    "PlanError",
    "RankPlan",
    "UniformConfig",
    "ara_plan",
    "check_keep",
    "drank_plan",
    "effective_rank",
    "plan_from_ranks",
    "uniform_plan",
    "uniform_rank",
]
