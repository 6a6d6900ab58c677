"""A model whose decoder blocks stay on disk: parameters on the ``meta`` device, read from the
checkpoint's safetensors files when a block is needed and dropped again afterwards.

Everything outside the decoder blocks (embeddings, final norm, LM head) is loaded at once; the
blocks cost nothing until :func:`load` brings one in. Compression then holds one dense block at a
time, plus what it builds: :func:`load` of a single linear just before it is swapped for its
factors, and of whatever stays dense at the end.
"""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path

import torch
from torch import nn

from lowrank_infer.structure import decoder_blocks

__all__ = ["DiskWeights", "fingerprint", "holds", "load", "load_offloaded", "release"]

# module -> (where its tensors are, its qualified name in the model)
_SOURCES: "weakref.WeakKeyDictionary[nn.Module, tuple[DiskWeights, str]]" = weakref.WeakKeyDictionary()


class DiskWeights:
    """The tensors of a directory of safetensors files, by name, read on demand."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{self.directory} holds no .safetensors files: weights on disk need a model "
                             "directory in safetensors format")
        self.files: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                self.files.update({name: file for name in f.keys()})

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise ValueError(f"{name} is not in the safetensors files of {self.directory} (a model whose "
                             "weights transformers renames on load cannot keep them on disk)")
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    def fingerprint(self) -> str:
        """A digest of every file's name, size and safetensors header (not of the values)."""
        digest = hashlib.sha256()
        for file in sorted(set(self.files.values())):
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                digest.update(f"{file.name}:{file.stat().st_size}:".encode() + f.read(size))
        return digest.hexdigest()


def holds(module: nn.Module) -> bool:
    """Whether ``module`` belongs to a model loaded by :func:`load_offloaded`."""
    return module in _SOURCES


def fingerprint(model: nn.Module) -> str:
    return _SOURCES[model][0].fingerprint()


def load(module: nn.Module, device, *, recurse: bool = True) -> None:
    """Read every parameter of ``module`` (and of its children, with ``recurse``) still on
    ``meta`` from disk onto ``device``."""
    source, qualified = _SOURCES[module]
    for name, param in list(module.named_parameters(recurse=recurse)):
        if param.is_meta:
            full = f"{qualified}.{name}" if qualified else name
            owner, leaf = _owner(module, name)
            data = source.tensor(full).to(device=device, dtype=param.dtype)
            if tuple(data.shape) != tuple(param.shape):
                raise ValueError(f"{full} is {tuple(data.shape)} on disk, {tuple(param.shape)} in the model")
            owner._parameters[leaf] = nn.Parameter(data, requires_grad=param.requires_grad)


def release(module: nn.Module) -> None:
    """Put ``module``'s parameters back on ``meta`` (their memory is freed)."""
    for name, param in list(module.named_parameters()):
        owner, leaf = _owner(module, name)
        owner._parameters[leaf] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def load_offloaded(directory: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM from a local safetensors model directory with its decoder blocks left on disk.

    Raises:
        ValueError: not a local directory of safetensors files, or tensors the model expects
            are missing from them.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"weights on disk need a local model directory (config.json and safetensors files); "
                         f"{directory} is not one")
    source = DiskWeights(directory)
    config = AutoConfig.from_pretrained(directory)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed, not stored
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, module in model.named_modules():
        _SOURCES[module] = (source, name)
    prefix, _ = decoder_blocks(model)
    for name, module in model.named_modules():
        if name != prefix and not name.startswith(prefix + ".") and not _tied_head(model, module):
            load(module, "cpu", recurse=False)  # everything outside the blocks, now
    model.tie_weights()
    return model.eval()


def _tied_head(model: nn.Module, module: nn.Module) -> bool:
    """The LM head of a model that ties it to the input embeddings (not stored separately)."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and module is model.get_output_embeddings()

