"""Dimensions of the models the benchmarks stand in for, and the layer shapes derived from them.

One table serves both benchmarks: ``bench kernels`` times each model's distinct projection
shapes, ``bench e2e --shape-only`` rebuilds the whole model from the same numbers with random
weights, so 7B-scale speed is measured without downloading a checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LAYERS", "MODELS", "LayerShape", "ModelDims", "hf_config", "layer_shapes"]

# Projection names of a decoder block, in model order.
LAYERS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class ModelDims:
    """Decoder dimensions of a Hugging Face model: enough to rebuild it with random weights."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    tie_embeddings: bool = False

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """Projection name → ``(out_features, in_features)`` of one decoder block."""
        head_dim = self.hidden // self.heads
        q, kv = self.heads * head_dim, self.kv_heads * head_dim
        return {
            "q": (q, self.hidden), "k": (kv, self.hidden), "v": (kv, self.hidden), "o": (self.hidden, q),
            "gate": (self.intermediate, self.hidden), "up": (self.intermediate, self.hidden),
            "down": (self.hidden, self.intermediate),
        }

    def hf_config(self):
        """The ``transformers`` config of this model (default attention, no RoPE scaling)."""
        from transformers import AutoConfig

        return AutoConfig.for_model(
            self.model_type, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
            max_position_embeddings=self.max_positions, tie_word_embeddings=self.tie_embeddings,
        )


MODELS = {
    "llama2-7b": ModelDims("llama", 4096, 11008, 32, 32, 32, 32000, 4096),
    "llama3-8b": ModelDims("llama", 4096, 14336, 32, 32, 8, 128256, 8192),
    "qwen2.5-7b": ModelDims("qwen2", 3584, 18944, 28, 28, 4, 152064, 32768),
    "smollm2-135m": ModelDims("llama", 576, 1536, 30, 9, 3, 49152, 8192, tie_embeddings=True),
}


@dataclass(frozen=True)
class LayerShape:
    """A weight shape of ``model``; ``layer`` names every projection that has it, e.g. ``"q/o"``."""

    model: str
    layer: str
    m: int
    n: int


def _known(kind: str, names, known) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown {kind} {', '.join(map(repr, unknown))} (known: {', '.join(known)})")


def layer_shapes(models: list[str], layers: list[str] = LAYERS) -> list[LayerShape]:
    """The distinct weight shapes among ``layers`` of each of ``models``.

    Projections that share a shape (q/k/v/o in LLaMA-2-7B) are timed once, under a joint name.

    Args:
        models: names from :data:`MODELS`.
        layers: projection names from :data:`LAYERS`.

    Raises:
        ValueError: an unknown model or layer name, listing the known ones.
    """
    _known("model", models, MODELS)
    _known("layer", layers, LAYERS)
    shapes = []
    for model in models:
        by_shape: dict[tuple[int, int], list[str]] = {}
        for name, shape in MODELS[model].layer_shapes().items():
            if name in layers:
                by_shape.setdefault(shape, []).append(name)
        shapes += [LayerShape(model, "/".join(names), m, n) for (m, n), names in by_shape.items()]
    return shapes


def hf_config(spec: str):
    """A ``transformers`` config from a name in :data:`MODELS` or a ``config.json`` (file or folder).

    Raises:
        ValueError: ``spec`` is neither, listing the known names.
    """
    if spec in MODELS:
        return MODELS[spec].hf_config()
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown config {spec!r}: not a config.json file or folder "
                         f"(known names: {', '.join(MODELS)})")
    from transformers import AutoConfig

    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a transformers config.json: {err}") from None
