"""Helpers for the allocation tests: spectra with chosen singular values, a tiny GQA Llama."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from lowrank_infer.factorize import Spectrum, plain_svd

HIDDEN, KV, MLP = 64, 32, 160  # tiny Llama: 4 heads of 16, 2 key/value heads
LLAMA_SHAPES = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (KV, HIDDEN),
    "v_proj": (KV, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (MLP, HIDDEN),
    "up_proj": (MLP, HIDDEN),
    "down_proj": (HIDDEN, MLP),
}


@contextmanager
def one_thread():
    """These tensors are tiny: extra threads only add contention (and crawl on a shared box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ara_cap(m: int, n: int) -> int:
    """The factor count the pipeline stores for ARA: rank at keep 1.2, at most min(m, n)."""
    return min(m, n, math.ceil(1.2 * m * n / (m + n)))


def spectrum_with(sigma, m: int, n: int, *, seed: int = 0, max_rank: int | None = None) -> Spectrum:
    """A plain-SVD spectrum of a random ``m×n`` matrix whose singular values are ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    r = min(m, n)
    full = torch.zeros(r, dtype=torch.float64)
    full[: sigma.numel()] = sigma
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))
    return plain_svd((u * full) @ v.T, max_rank=max_rank)


def decay_spectrum(m: int, n: int, decay: float, seed: int = 0, max_rank: int | None = None) -> Spectrum:
    """Singular values ``decay**i``: a small decay concentrates energy (low effective rank)."""
    r = min(m, n)
    return spectrum_with(decay ** torch.arange(r, dtype=torch.float64), m, n, seed=seed, max_rank=max_rank)


def sigma_only(sigma, m: int, n: int) -> Spectrum:
    """A spectrum with the given singular values and zero factors (enough for D-Rank)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    cap = max(1, (m * n - 1) // (m + n))
    return Spectrum(sigma, torch.zeros(m, cap), torch.zeros(n, cap), whitened=True)


def llama_names(layers: int) -> dict[str, tuple[int, int]]:
    names = {}
    for i in range(layers):
        for kind, shape in LLAMA_SHAPES.items():
            block = "self_attn" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            names[f"model.layers.{i}.{block}.{kind}"] = shape
    return names


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()
