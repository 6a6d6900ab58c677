"""Tensor-parallel layouts of a low-rank layer: the user's switch, and the fully sharded forward.

``tp_sharding`` picks one of two layouts (README "Serving with vLLM" weighs their memory):

* ``"half"`` (default): shard only what vLLM shards for a dense layer. Column-parallel layers
  hold their rows of U and all of V; row-parallel ones their rows of V and all of U.
* ``"full"``: also split what stays replicated in "half", as vLLM's ``--fully-sharded-loras``
  does for LoRA. A column-parallel layer holds ``V[:, k/tp]``, all-gathers the ``[T, k]``
  intermediate, then applies its rows of U; a row-parallel layer all-reduces its partial
  ``[T, k]`` intermediate, applies its ``m/tp`` rows of U and writes them into a zero ``[T, m]``
  output that vLLM's own all-reduce completes. Per rank: ``(m + n)·k/tp`` factor numbers.

The switch is read where vLLM reads the checkpoint's ``quantization_config``, in every process:
the environment variable (a deployment's choice, inherited by vLLM's workers) wins over the
``quantization_config`` key (a checkpoint's default; vLLM's ``hf_overrides`` replaces the whole
``quantization_config``, so an override must carry the rank plan too).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["TP_SHARDINGS", "TP_SHARDING_ENV", "TP_SHARDING_KEY", "check_tp_sharding", "column_intermediates",
           "fully_sharded_kind", "resolve_tp_sharding", "row_output"]

TP_SHARDING_KEY = "tp_sharding"
TP_SHARDING_ENV = "LOWRANK_INFER_TP_SHARDING"
TP_SHARDINGS = ("half", "full")


def resolve_tp_sharding(quantization_config: dict[str, Any]) -> str:
    """The layout to use: ``$LOWRANK_INFER_TP_SHARDING`` if set and not empty, else the config's key.

    Raises:
        ValueError: the value is not one of :data:`TP_SHARDINGS`; the message names where it came from.
    """
    env = os.environ.get(TP_SHARDING_ENV, "")
    if env:
        return check_tp_sharding(env, f"environment variable {TP_SHARDING_ENV}")
    return check_tp_sharding(quantization_config.get(TP_SHARDING_KEY, "half"),
                             f"quantization_config[{TP_SHARDING_KEY!r}]")


def check_tp_sharding(value: Any, where: str) -> str:
    """``value`` if it is one of :data:`TP_SHARDINGS`; else a ``ValueError`` naming ``where`` it was set."""
    if value not in TP_SHARDINGS:
        choices = " or ".join(repr(choice) for choice in TP_SHARDINGS)
        raise ValueError(f"lowrank_infer tensor-parallel sharding: {where} is {value!r}, expected {choices}")
    return value


def fully_sharded_kind(layer) -> str | None:
    """``"column"`` or ``"row"`` where the fully sharded layout applies to ``layer``, else ``None``.

    It applies only to a layer sharded over the whole tensor-parallel group, because vLLM's
    collectives run over that group. Replicated layers and layers sharded over a sub-group
    (decode context parallel) keep the half layout, which follows the layer's own sharding.
    """
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

    if layer.tp_size == 1 or (layer.tp_size, layer.tp_rank) != (
            get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()):
        return None
    if isinstance(layer, RowParallelLinear):
        return "row"
    if isinstance(layer, ColumnParallelLinear):
        return "column"
    return None


def column_intermediates(x: torch.Tensor, V: torch.Tensor, widths: list[int], tp_size: int) -> list[torch.Tensor]:
    """Each low-rank slice's whole ``[..., k]`` intermediate ``x V``, from this rank's columns
    ``V = [V_1[:, k_1/tp] | V_2[:, k_2/tp] | ...]`` (``widths`` = their column counts).

    One shrink and one all-gather for the layer, however many slices: every rank's
    ``[x V_1 | x V_2 | ...]`` goes out in one message, and rank r's columns of slice i are then
    its ``r``-th k block.
    """
    from vllm.distributed import tensor_model_parallel_all_gather

    local = x @ V
    gathered = tensor_model_parallel_all_gather(local.contiguous(), dim=-1)
    if len(widths) == 1:
        return [gathered]
    by_rank = gathered.unflatten(-1, (tp_size, local.shape[-1]))
    results, offset = [], 0
    for width in widths:
        results.append(by_rank[..., offset:offset + width].flatten(-2))
        offset += width
    return results


def row_output(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, start: int, out_features: int,
               bias: torch.Tensor | None) -> torch.Tensor:
    """This rank's addend of a row-parallel layer's output: its ``U`` rows' outputs at ``start``, zeros elsewhere.

    ``x`` is this rank's part of the input and ``V`` its rows, so ``x V`` is a partial sum of the
    ``[..., k]`` intermediate; all-reducing it (``k`` numbers a token, fewer than the output's)
    gives every rank the whole intermediate. vLLM's all-reduce of the layer output then sums
    the ranks' disjoint row blocks, and the bias that vLLM hands to rank 0 only.
    """
    from vllm.distributed import tensor_model_parallel_all_reduce

    z = tensor_model_parallel_all_reduce(x @ V)
    y = F.pad(F.linear(z, U), (start, out_features - start - U.shape[0]))
    return y if bias is None else y + bias
