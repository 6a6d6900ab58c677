"""Serve lowrank_infer checkpoints with vLLM: ``vllm serve DIR`` and ``LLM(model=DIR)``, no flag.

vLLM runs every ``vllm.general_plugins`` entry point (pyproject.toml) in each process it
starts, engine and workers alike, before it reads a model's config. :func:`register` then
makes the checkpoint's ``quant_method`` ("lowrank_infer") a vLLM quantization method, whose
config reads the rank plan from ``config.json`` and gives every planned linear a
:class:`LowRankLinearMethod` (layout and tensor parallelism: see its module).

Parallelism:

* Tensor parallel, by default, shards what vLLM shards for a dense layer: U's rows in
  column-parallel layers (V replicated), V's rows in row-parallel ones (U replicated, partial
  sums all-reduced by the layer). Any TP size that serves the dense model serves the compressed one.
* Fully sharded (``tp_sharding="full"`` or ``LOWRANK_INFER_TP_SHARDING=full``): also split what
  the default replicates. A column-parallel layer holds ``V[:, k/tp]`` (k zero-padded to a
  multiple of the TP size) and all-gathers the ``tokens × k`` intermediate before its rows of U;
  a row-parallel layer all-reduces ``z = Σ_r x_r V_r`` (``tokens × k``) and applies its ``m/tp``
  rows of U into a zero output that the layer's own all-reduce completes. ``(m + n)·k/tp`` per
  rank, one more collective per layer: :mod:`~lowrank_infer.vllm_plugin.sharding`.
* Pipeline parallel needs nothing: each stage builds only its own decoder blocks, every layer
  looks its slices up in the plan by name, and vLLM's loader skips the other stages' tensors.
"""

from lowrank_infer.vllm_plugin.config import LowRankVllmConfig
from lowrank_infer.vllm_plugin.linear import LowRankLinearMethod

__all__ = ["LowRankLinearMethod", "LowRankVllmConfig", "register"]


def register() -> None:
    """Register the ``lowrank_infer`` quantization method with vLLM (idempotent)."""
    from vllm.model_executor.layers.quantization import register_quantization_config

    register_quantization_config(LowRankVllmConfig.get_name())(LowRankVllmConfig)
