"""Parameter and byte counts of models and checkpoints, for summaries and ``info``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from torch import nn

from lowrank_infer.allocation import RankPlan

__all__ = ["checkpoint_info", "model_size", "safetensors_header"]


def model_size(model: nn.Module) -> dict[str, int]:
    """Whole-model parameters and bytes (tied weights counted once)."""
    params = list(model.parameters())  # nn.Module dedups shared parameters
    return {"params": sum(p.numel() for p in params), "bytes": sum(p.numel() * p.element_size() for p in params)}


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name → dtype, shape, offsets)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is truncated (no safetensors header)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2**20:
            raise ValueError(f"{path} is not a safetensors file (header size {size})")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header


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
