"""Make compressed checkpoints load natively through ``AutoModelForCausalLM.from_pretrained``.

A saved model's ``config.json`` carries ``quantization_config = {"quant_method": "lowrank_infer",
"rank_plan": {...}}``. Registering the config class and the quantizer with transformers' public
hooks lets ``from_pretrained`` (and so lm-eval's ``HFLM``, ``device_map``, ``generate``) swap the
planned linears for empty ``LowRankLinear`` modules on the meta device before the weights load,
and pack the loaded model for inference (:func:`lowrank_infer.packing.pack_model`) after. A
``"pack": false`` in the ``quantization_config`` handed to ``from_pretrained`` (through its
``config``; ``load_compressed(path, pack=False)`` does that) leaves the model unpacked.

Without the registration transformers only logs "Unknown quantization type ... we will skip the
quantization", builds the dense model, reports the factors as unexpected keys and fills every
factorized linear with random weights. So :func:`lowrank_infer.save_compressed` also writes
``"transformers_weights": REFUSAL`` into ``config.json``: transformers takes that key as the name
of the weights file and rejects a name that is not ``*.safetensors`` with a ``ValueError`` that
quotes it, so an unregistered load stops with this message instead. :class:`LowRankQuantizer`
removes the key before transformers looks for the weight files.
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
from lowrank_infer.packing import pack_model, unshared_state_dict
from lowrank_infer.surgery import build_lowrank_skeleton

QUANT_METHOD = "lowrank_infer"

# The value is shown to whoever loads the checkpoint without lowrank_infer, so it says what to do.
# Checkpoints are recognised by the prefix alone: the advice after it may change between versions.
REFUSAL_PREFIX = "lowrank_infer checkpoint:"
REFUSAL = (
    f"{REFUSAL_PREFIX} its linear layers are low-rank factors that plain transformers would replace "
    "with random weights. Install the lowrank-infer package (pip install lowrank-infer) and run "
    "`import lowrank_infer` before from_pretrained, or load it with lowrank_infer.load_compressed(path)"
)

__all__ = ["QUANT_METHOD", "REFUSAL", "LowRankConfig", "LowRankQuantizer", "is_refusal", "register"]


def is_refusal(value: Any) -> bool:
    """True for the ``transformers_weights`` value that :data:`REFUSAL` puts in saved configs."""
    return isinstance(value, str) and value.startswith(REFUSAL_PREFIX)


def _accept(config):
    """``config`` without the refusal that keeps transformers without lowrank_infer from loading it."""
    if is_refusal(getattr(config, "transformers_weights", None)):
        del config.transformers_weights
    return config


class LowRankConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compressed checkpoint: its rank plan, and whether loading
    packs the model (a loading option, never saved)."""

    def __init__(self, rank_plan: dict[str, Any] | None = None, pack: bool = True, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        if rank_plan is None:
            raise ValueError("a lowrank_infer quantization_config needs a rank_plan")
        # Parsed once, here, so that a broken plan fails at config load with the plan's own error.
        self.plan = RankPlan.from_dict(rank_plan)
        self.pack = pack

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "rank_plan": self.plan.to_dict()}


class LowRankQuantizer(HfQuantizer):
    """Builds the low-rank module skeleton before transformers loads a checkpoint's weights."""

    requires_calibration = True  # a checkpoint must already hold the factors

    # transformers hands the model config to a quantizer before it looks for the weight files only
    # through these hooks, which return it unchanged in the base class: update_tp_plan up to 5.18,
    # update_attn_implementation from 5.18 on (read in the 5.0, 5.6, 5.12, 5.18, 5.22 and 5.24
    # sources). Either drops the refusal (see REFUSAL) so that the usual weight-file lookup runs.

    def update_tp_plan(self, config):
        return _accept(config)

    def update_attn_implementation(self, config):
        return _accept(config)

    def _process_model_before_weight_loading(self, model, **kwargs):
        return build_lowrank_skeleton(model, self.quantization_config.plan)

    def _process_model_after_weight_loading(self, model, **kwargs):
        # The factors are plain floating-point tensors: unlike a quantized model, this one may
        # be cast (transformers refuses .half() / .float() while is_quantized is set).
        model.is_quantized = False
        if self.quantization_config.pack:
            pack_model(model)
        return model

    def get_state_dict_and_metadata(self, model):
        # transformers saves what this returns, instead of a state_dict handed to save_pretrained.
        return unshared_state_dict(model), {}

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
