"""Parameter and byte counts of models and checkpoints, for summaries and ``info``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lowrank_infer.allocation import RankPlan
from lowrank_infer.io import safetensors_header

__all__ = ["checkpoint_info", "model_size"]


def model_size(model: nn.Module) -> dict[str, int]:
    """Whole-model parameters and bytes (tied weights counted once)."""
    params = list(model.parameters())  # nn.Module dedups shared parameters
    return {"params": sum(p.numel() for p in params), "bytes": sum(p.numel() * p.element_size() for p in params)}


def checkpoint_info(path: Path, plan: RankPlan) -> dict:
    """Sizes of a saved compressed checkpoint, read from file headers without loading weights."""
    params = nbytes = 0
    for shard in sorted(path.glob("*.safetensors")):
        for entry in safetensors_header(shard).values():
            numel = 1
            for dim in entry["shape"]:
                numel *= dim
            params += numel
            start, end = entry["data_offsets"]
            nbytes += end - start
    summary = plan.summary()
    dense_params = params - summary["params_after"] + summary["params_before"]
    return {
        "params_after": params,
        "params_before": dense_params,
        "bytes_after": nbytes,
        # Estimated for the dense model at the checkpoint's average bytes per parameter.
        "bytes_before_estimate": round(nbytes * dense_params / params) if params else 0,
        "target_params_before": summary["params_before"],
        "target_params_after": summary["params_after"],
        "keep_achieved": summary["keep_achieved"],
        "dense_layers": summary["dense_layers"],
        "layers": summary["layers"],
    }
