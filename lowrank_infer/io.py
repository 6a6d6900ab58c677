"""Save and load compressed models as ordinary Hugging Face checkpoints (safetensors + JSON).

Writes go to a temporary directory beside the destination that is renamed into place, so an
interrupted save never leaves a directory that looks like a whole model.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from lowrank_infer.allocation.plan import RankPlan
from lowrank_infer.atomic import atomic_directory
from lowrank_infer.hf_quantizer import QUANT_METHOD, LowRankConfig, register
from lowrank_infer.module import LowRankLinear

PLAN_FILE = "rank_plan.json"

__all__ = [
    "PLAN_FILE", "attach_plan", "is_compressed_checkpoint", "load_compressed", "model_plan", "safetensors_header",
    "save_compressed",
]


def attach_plan(model: nn.Module, plan: RankPlan) -> None:
    """Record ``plan`` in the model's config, where checkpoints and loaders look for it."""
    model.config.quantization_config = LowRankConfig(rank_plan=plan.to_dict())
    # A model loaded from another quantized format (e.g. GGUF) carries that format's quantizer;
    # the factors written now are plain tensors, so it must not take part in saving.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def model_plan(model: nn.Module) -> RankPlan:
    """The rank plan a compressed model carries; ``ValueError`` when it carries none."""
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(qconfig, dict) and qconfig.get("quant_method") == QUANT_METHOD:
        qconfig = LowRankConfig(**qconfig)
    if not isinstance(qconfig, LowRankConfig):
        raise ValueError("model carries no lowrank_infer rank plan: compress it first (lowrank_infer.compress)")
    return qconfig.plan


def _check_modules(model: nn.Module, plan: RankPlan) -> None:
    for layer in plan.layers:
        module = model.get_submodule(layer.name)
        rank = getattr(module, "rank", None) if isinstance(module, LowRankLinear) else None
        if rank != layer.rank:
            raise ValueError(f"layer {layer.name!r} has rank {rank} in the model but {layer.rank} in the plan")


def _prepare_destination(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {path} is not empty (pass overwrite=True / --overwrite)")


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
) -> Path:
    """Write a compressed model as a Hugging Face checkpoint directory.

    Args:
        model: a model compressed by :func:`lowrank_infer.compress` (it carries its rank plan).
        path: destination directory; must be absent or empty unless ``overwrite``.
        tokenizer: saved beside the weights when given.
        overwrite: replace an existing non-empty directory.
        max_shard_size: safetensors shard size (transformers' format, e.g. ``"2GB"``).

    Returns:
        The checkpoint directory.
    """
    plan = model_plan(model)
    _check_modules(model, plan)
    path = Path(path)
    _prepare_destination(path, overwrite)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / PLAN_FILE)
    return path


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a model directory (no config.json)")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None


def is_compressed_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a lowrank_infer checkpoint."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    qconfig = _read_config(path).get("quantization_config") or {}
    return qconfig.get("quant_method") == QUANT_METHOD


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


def _check_shards(path: Path) -> None:
    """Every safetensors shard must be complete: a truncated copy is reported, not half-loaded."""
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{path} holds no .safetensors weights")
    for shard in shards:
        header = safetensors_header(shard)
        end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        with open(shard, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
        if shard.stat().st_size < 8 + header_size + end:
            raise ValueError(f"checkpoint file {shard} is truncated ({shard.stat().st_size} bytes, header needs {8 + header_size + end})")


def load_compressed(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a compressed checkpoint; refuses anything that would not load exactly.

    Registration with transformers happens first, and every weight of the checkpoint must land
    in the model: a missing, unexpected or mis-shaped tensor is an error, never a silently
    random-initialized layer.

    Args:
        path: a directory written by :func:`save_compressed`.
        device: where the model is placed.
        dtype: parameter dtype (default: as saved).
    """
    from transformers import AutoModelForCausalLM

    register()
    path = Path(path)
    if not is_compressed_checkpoint(path):
        raise ValueError(f"{path} is not a lowrank_infer checkpoint (config.json has no quant_method {QUANT_METHOD!r})")
    _check_shards(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", device_map=str(device), output_loading_info=True
        )
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"could not load checkpoint {path}: {err}") from None
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        kind, keys = next(iter(problems.items()))
        raise ValueError(f"checkpoint {path} does not match its model ({kind}: {sorted(keys)[:3]})")
    _check_modules(model, model_plan(model))
    return model
