"""Shared fixtures: tiny random HF models of several architectures, and the real-data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LOWRANK_INFER_DATA", REPO.parent / "shared" / "data"))


def tiny_config(arch: str):
    """A 2-block config of ``arch`` with GQA (4 query heads, 2 key/value heads)."""
    import transformers

    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    if arch == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=True, **common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=16, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=True, **common)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=16, tie_word_embeddings=True, **common)
    if arch == "gemma":
        return transformers.GemmaConfig(head_dim=16, **common)
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(head_dim=16, sliding_window=16, **common)
    if arch == "phi3":
        return transformers.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi3"]


def tiny_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


@pytest.fixture
def data_dir() -> Path:
    if not (DATA / "wikitext2" / "test.raw.txt").is_file():
        pytest.skip(f"WikiText-2 files not found under {DATA} (set LOWRANK_INFER_DATA)")
    return DATA


def tiny_tokenizer():
    """A character-level tokenizer over printable ASCII (ids < 128), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 10})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A dense tiny Llama (GQA) checkpoint with a tokenizer, as a local HF directory."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_text(tmp_path) -> Path:
    """A few kilobytes of English-like text for calibration and evaluation."""
    words = "the of and to in is was for on as with by at from his her an which it were are".split()
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (1500,), generator=gen).tolist()
    path = tmp_path / "text.txt"
    path.write_text(" ".join(words[i] for i in picks) + "\n", encoding="utf-8")
    return path
