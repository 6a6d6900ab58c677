"""Make compressed checkpoints load natively through ``AutoModelForCausalLM.from_pretrained``.

A saved model's ``config.json`` carries ``quantization_config = {"quant_method": "lowrank_infer",
"rank_plan": {...}}``. Registering the config class and the quantizer with transformers' public
hooks lets ``from_pretrained`` (and so lm-eval's ``HFLM``, ``device_map``, ``generate``) swap the
planned linears for empty ``LowRankLinear`` modules on the meta device before the weights load.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowrank_infer.allocation.plan import RankPlan
from lowrank_infer.surgery import build_lowrank_skeleton

QUANT_METHOD = "lowrank_infer"

__all__ = ["QUANT_METHOD", "LowRankConfig", "LowRankQuantizer", "register"]


class LowRankConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compressed checkpoint: its rank plan."""

    def __init__(self, rank_plan: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        if rank_plan is None:
            raise ValueError("a lowrank_infer quantization_config needs a rank_plan")
        # Parsed once, here, so that a broken plan fails at config load with the plan's own error.
        self.plan = RankPlan.from_dict(rank_plan)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "rank_plan": self.plan.to_dict()}


class LowRankQuantizer(HfQuantizer):
    """Builds the low-rank module skeleton before transformers loads a checkpoint's weights."""

    requires_calibration = True  # a checkpoint must already hold the factors

    def _process_model_before_weight_loading(self, model, **kwargs):
        return build_lowrank_skeleton(model, self.quantization_config.plan)

    def _process_model_after_weight_loading(self, model, **kwargs):
        # The factors are plain floating-point tensors: unlike a quantized model, this one may
        # be cast (transformers refuses .half() / .float() while is_quantized is set).
        model.is_quantized = False
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register with transformers once (idempotent: importing lowrank_infer calls it)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowRankConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowRankQuantizer)
