"""Tiny random Hugging Face models of every supported architecture, and a tokenizer for them.

A plain module (not conftest) so that test files anywhere can import it by a unique name.
"""

from __future__ import annotations

import torch


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
        # One sliding-window and one full-attention layer, as in the real model: each layer type
        # has its own mask and RoPE, and a window shorter than the test sequences makes them differ.
        return transformers.Gemma3TextConfig(head_dim=16, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"], **common)
    if arch == "qwen2-swa":  # sliding window on the layers from max_window_layers on
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **common)
    if arch == "phi3":
        return transformers.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi3"]


def tiny_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


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
