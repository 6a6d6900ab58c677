"""Save and load compressed models as ordinary Hugging Face checkpoints (safetensors + JSON).

Writes go to a temporary directory beside the destination that is renamed into place, so an
interrupted save never leaves a directory that looks like a whole model.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from torch import nn

from lowrank_infer.allocation.plan import RankPlan
from lowrank_infer.atomic import atomic_directory
from lowrank_infer.hf_quantizer import QUANT_METHOD, REFUSAL, LowRankConfig, register
from lowrank_infer.module import LowRankLinear
from lowrank_infer.packing import unshared_state_dict

PLAN_FILE = "rank_plan.json"
CARD_FILE = "README.md"

__all__ = [
    "CARD_FILE", "PLAN_FILE", "attach_plan", "is_compressed_checkpoint", "load_compressed", "model_card", "model_plan",
    "safetensors_header", "save_compressed",
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


# ---------------------------------------------------------------- model card (README.md)

CARD_TAGS = ["lowrank-infer", "svd", "low-rank", "compressed"]
# "org/name": a Hub model id. Bare names are not taken: a CLI alias such as "smollm2-135m" looks
# like one, and metadata naming a model that is not the base would be worse than none.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(model_id: str) -> str | None:
    """``model_id`` when it names a Hub model (``org/name``, not a local path), else ``None``."""
    if not _HUB_ID.match(model_id) or os.path.exists(model_id):
        return None
    return model_id


def _check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """``metrics`` as a plain dict of name → number or text; ``ValueError`` on anything else."""
    checked = {}
    for name, value in (metrics or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric names must be non-empty strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"metric {name!r} must be a number or text, got {type(value).__name__}")
        checked[name] = value
    return checked


def _front_matter(base_model: str | None) -> str:
    # JSON strings are valid YAML scalars, so json.dumps quotes ids safely without a YAML writer.
    lines = ["---"]
    if base_model:
        lines += [f"base_model: {json.dumps(base_model)}", "base_model_relation: quantized"]
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in CARD_TAGS]
    return "\n".join(lines + ["---"])


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "\n".join(f"| {name} | {_number(value)} |" for name, value in rows)
    return f"| | |\n|---|---|\n{body}"


def _compression_rows(plan: RankPlan, model_params: int | None) -> list[tuple[str, Any]]:
    summary = plan.summary()
    removed = summary["params_before"] - summary["params_after"]
    rows = [
        ("method", plan.method),
        ("keep target (kept ÷ target-linear parameters)", plan.keep_target),
        ("keep achieved", summary["keep_achieved"]),
        ("target linears", summary["layers"]),
        ("of which kept dense (past break-even k·(m+n) ≥ m·n)", summary["dense_layers"]),
        ("target-linear parameters before", summary["params_before"]),
        ("target-linear parameters after", summary["params_after"]),
    ]
    if model_params is not None:
        rows += [("whole-model parameters before", model_params + removed), ("whole-model parameters after", model_params)]
    rows += [(f"hyper-parameter `{name}`", json.dumps(value)) for name, value in sorted(plan.params.items())]
    return rows


def _usage(name: str) -> str:
    return f"""## How to use

```python
import lowrank_infer  # registers the format with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

`lowrank_infer.load_compressed("{name}")` loads it too, and refuses a checkpoint that is
incomplete. Without the `lowrank-infer` package, transformers refuses this checkpoint with an
error instead of running it with random weights. `lowrank_infer.dequantize(model)` turns the
loaded model into an ordinary dense one that `save_pretrained` writes for any tool.

Serve it with vLLM (the `lowrank-infer` package provides the vLLM plugin):

```bash
vllm serve {name}
```

Evaluate it with the LM Evaluation Harness (`pip install "lowrank-infer[eval]"`):

```bash
lowrank-infer lm-eval {name} --tasks hellaswag,arc_easy
```"""


def model_card(
    plan: RankPlan, name: str, *, base_model: str | None = None, model_params: int | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> str:
    """The ``README.md`` of a checkpoint directory called ``name`` holding a model compressed by ``plan``.

    Hugging Face metadata first (``base_model`` with ``base_model_relation: quantized`` links the
    checkpoint to its base model on the Hub), then what a user of a compressed format looks for:
    method and keep ratio, layers kept dense, parameters before and after, measured quality, and
    how to load, serve and evaluate it.

    Args:
        plan: the checkpoint's rank plan.
        name: what the usage examples load (the directory name, or a Hub id).
        base_model: Hub id of the model it was compressed from (default: the plan's model id when
            it has the form ``org/name`` and is not a local path).
        model_params: whole-model parameter count after compression, when known.
        metrics: measured quality, name → number or text (e.g. ``{"perplexity, wikitext2": 12.3}``).
    """
    base = base_model or _hub_id(plan.model)
    origin = f"[{base}](https://huggingface.co/{base})" if base else (f"`{plan.model}`" if plan.model else "A model")
    parts = [
        _front_matter(base),
        f"# {name}",
        f"{origin} compressed by [lowrank-infer](https://pypi.org/project/lowrank-infer/): every target "
        "linear layer (attention and MLP projections in the decoder blocks) is replaced by low-rank factors "
        "`W ≈ U Vᵀ` of a truncated SVD (data-whitened unless the hyper-parameters below say `whiten` false), "
        f"with ranks allocated by `{plan.method}` under a global parameter budget "
        f"(keep {plan.keep_target:g}). Embeddings and the LM head are unchanged. Per-layer ranks are in "
        "`rank_plan.json`.",
        "## Compression",
        _table(_compression_rows(plan, model_params)),
    ]
    checked = _check_metrics(metrics)
    if checked:
        parts += ["## Measured quality", _table(list(checked.items()))]
    parts.append(_usage(name))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- saving


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # nn.Module yields a tied weight once


def _refuse_plain_transformers(checkpoint: Path) -> None:
    """Make ``config.json`` unloadable by transformers without lowrank_infer (see ``REFUSAL``)."""
    config_file = checkpoint / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["transformers_weights"] = REFUSAL
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
    metrics: Mapping[str, Any] | None = None,
    base_model: str | None = None,
) -> Path:
    """Write a compressed model as a Hugging Face checkpoint directory.

    Besides the weights and config: ``rank_plan.json`` and a model card ``README.md`` (Hub
    metadata, compression summary, ``metrics``, how to load). ``config.json`` is written so that
    transformers without lowrank_infer refuses the checkpoint instead of loading random weights.

    Args:
        model: a model compressed by :func:`lowrank_infer.compress` (it carries its rank plan).
        path: destination directory; must be absent or empty unless ``overwrite``.
        tokenizer: saved beside the weights when given.
        overwrite: replace an existing non-empty directory.
        max_shard_size: safetensors shard size (transformers' format, e.g. ``"2GB"``).
        metrics: measured quality for the model card, name → number or text
            (e.g. ``{"perplexity, wikitext2 test": 14.2, "perplexity of the dense model": 12.9}``).
        base_model: Hub id of the model it was compressed from, for the card's metadata
            (default: the plan's model id when it has the form ``org/name``).

    Returns:
        The checkpoint directory.
    """
    plan = model_plan(model)
    _check_modules(model, plan)
    path = Path(path)
    # Rendered first: bad metrics are refused before anything is written.
    card = model_card(plan, path.name, base_model=base_model, model_params=_param_count(model), metrics=metrics)
    _prepare_destination(path, overwrite)
    with atomic_directory(path) as tmp:
        # A packed model's factors share storage (a loaded model's quantizer supplies the same dict).
        model.save_pretrained(tmp, state_dict=unshared_state_dict(model), safe_serialization=True,
                              max_shard_size=max_shard_size)
        _refuse_plain_transformers(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / PLAN_FILE)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
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
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    *, pack: bool = True,
) -> nn.Module:
    """Load a compressed checkpoint; refuses anything that would not load exactly.

    Registration with transformers happens first, and every weight of the checkpoint must land
    in the model: a missing, unexpected or mis-shaped tensor is an error, never a silently
    random-initialized layer.

    Args:
        path: a directory written by :func:`save_compressed`.
        device: where the model is placed.
        dtype: parameter dtype (default: as saved).
        pack: pack the model for inference (:func:`lowrank_infer.packing.pack_model`: rank-major
            factors, one shrink for q/k/v and one fused gate/up per block), as a plain
            ``AutoModelForCausalLM.from_pretrained`` does too; ``False`` leaves every layer on its
            own, with ``V`` as stored in the checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    register()
    path = Path(path)
    if not is_compressed_checkpoint(path):
        raise ValueError(f"{path} is not a lowrank_infer checkpoint (config.json has no quant_method {QUANT_METHOD!r})")
    _check_shards(path)
    try:
        config = AutoConfig.from_pretrained(path)
        config.quantization_config = {**config.quantization_config, "pack": pack}  # see LowRankConfig
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype or "auto", device_map=str(device), output_loading_info=True
        )
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"could not load checkpoint {path}: {err}") from None
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        kind, keys = next(iter(problems.items()))
        raise ValueError(f"checkpoint {path} does not match its model ({kind}: {sorted(keys)[:3]})")
    _check_modules(model, model_plan(model))
    return model
