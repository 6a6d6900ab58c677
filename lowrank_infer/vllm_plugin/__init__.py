"""Serve lowrank_infer checkpoints with vLLM: ``vllm serve DIR`` and ``LLM(model=DIR)``, no flag.

vLLM runs every ``vllm.general_plugins`` entry point (pyproject.toml) in each process it
starts, engine and workers alike, before it reads a model's config. :func:`register` then
makes the checkpoint's ``quant_method`` ("lowrank_infer") a vLLM quantization method, whose
config reads the rank plan from ``config.json`` and gives every planned linear a
:class:`LowRankLinearMethod` (layout and tensor parallelism: see its module).

Parallelism, and what was not chosen:

* Tensor parallel shards what vLLM shards for a dense layer: U's rows in column-parallel layers
  (V replicated), V's rows in row-parallel ones (U replicated, partial sums all-reduced by the
  layer). Any TP size that serves the dense model serves the compressed one.
* Fully sharded alternative: also split the rank dimension k. A column-parallel layer would
  hold ``V[:, k_r]``, compute ``z_r = x V_r`` and all-gather ``z`` (``tokens × k``) before its
  rows of U; a row-parallel layer would all-reduce ``z = Σ_r x_r V_r`` (``tokens × k``,
  smaller than the ``tokens × out`` all-reduce of today, since ``k < out``) and hold all of U.
  It saves the replicated ``V`` (``in × k`` per column-parallel slice, per rank) at the price of
  one more collective per column-parallel layer, needs ``k`` divisible by the TP size (or
  padded), and the row-parallel variant must replace the all-reduce that vLLM's
  ``RowParallelLinear`` does itself. Not implemented.
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
