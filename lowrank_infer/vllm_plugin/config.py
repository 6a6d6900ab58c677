"""The vLLM quantization config of a compressed checkpoint: its rank plan, and a method per layer."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import QuantizationConfig

from lowrank_infer.allocation.plan import LayerRank, PlanError, RankPlan
from lowrank_infer.hf_quantizer import QUANT_METHOD
from lowrank_infer.vllm_plugin.linear import LowRankLinearMethod
from lowrank_infer.vllm_plugin.sharding import check_tp_sharding, resolve_tp_sharding

__all__ = ["LowRankVllmConfig"]


class LowRankVllmConfig(QuantizationConfig):
    """``quantization_config = {"quant_method": "lowrank_infer", "rank_plan": {...}}`` for vLLM.

    An optional ``"tp_sharding": "half" | "full"`` key (or ``$LOWRANK_INFER_TP_SHARDING``, which
    wins) picks the tensor-parallel layout: :mod:`lowrank_infer.vllm_plugin.sharding`.

    Args:
        plan: the checkpoint's rank plan.
        tp_sharding: ``"half"`` (shard what vLLM shards for a dense layer) or ``"full"``.
    """

    def __init__(self, plan: RankPlan, tp_sharding: str = "half") -> None:
        super().__init__()
        self.plan = plan
        self.tp_sharding = check_tp_sharding(tp_sharding, "tp_sharding")
        self._layers: dict[str, LayerRank] = {layer.name: layer for layer in plan.layers}

    def __repr__(self) -> str:
        summary = self.plan.summary()
        return (f"LowRankVllmConfig(method={self.plan.method!r}, layers={summary['layers']}, "
                f"dense_layers={summary['dense_layers']}, keep={summary['keep_achieved']:.4f}, "
                f"tp_sharding={self.tp_sharding!r})")

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # Two GEMMs (or our Triton kernels) need nothing newer than what vLLM itself needs.
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the plan travels inside config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LowRankVllmConfig":
        if "rank_plan" not in config:
            raise PlanError(f"a {QUANT_METHOD} quantization_config needs a rank_plan, got keys {sorted(config)}")
        return cls(RankPlan.from_dict(config["rank_plan"]), resolve_tp_sharding(config))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # Models whose vLLM module names differ from the checkpoint's (e.g. a "language_model."
        # prefix) hand their renames here; plan names follow so that prefixes still match.
        self._layers = hf_to_vllm_mapper.apply_dict(self._layers)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings and the LM head are never compressed
        names = self._checkpoint_names(prefix)
        ranks = [self._layers.get(name) for name in names]
        if all(entry is None or entry.rank is None for entry in ranks):
            # Dense (or not planned at all, e.g. excluded by `exclude`): vLLM's own path.
            return UnquantizedLinearMethod()
        return LowRankLinearMethod(prefix, names, ranks, self.tp_sharding)

    def _checkpoint_names(self, prefix: str) -> list[str]:
        """The checkpoint linears vLLM merged into ``prefix`` (q/k/v → qkv_proj), in slice order."""
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf, [leaf])
        return [f"{parent}.{part}" if parent else part for part in parts]
