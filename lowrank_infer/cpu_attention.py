"""Causal self-attention for the passes that only steer, on a CPU under bfloat16 autocast.

Healing, its dense targets, ARA's masks and block refinement run full causal windows through the
model (:mod:`lowrank_infer.precision`). PyTorch's CPU flash-attention kernel takes a third of a
healing step on SmolLM2 (``benchmarks/results/cpu/heal_step_breakdown_smollm2_epyc.txt``); its
backward pass runs at a fraction of the speed of the same work as bfloat16 matrix products. Here a
window's queries are taken :data:`CHUNK_ROWS` at a time, each chunk against the keys up to its last
row only (the causal mask then costs five eighths of the full square at 512 tokens, not all of
it), and the query heads that share a key/value head are stacked into one product (grouped-query
attention without repeating keys). Scores and probabilities are bfloat16 with float32 accumulation
inside each product and softmax, as in an eager bfloat16 attention; the backward pass is written
out (``dS = P ⊙ (dP − rowsum(dP ⊙ P))``) so that autograd keeps only the probabilities.

:func:`steering_attention` switches a model (or a block of one) to it for the length of a pass.
Anything else (a mask, dropout, a sliding window, soft-capping, other devices, float32, decoding)
goes to transformers' own SDPA attention unchanged, and every evaluation runs outside these passes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["CHUNK_ROWS", "IMPLEMENTATION", "causal_attention", "steering_attention"]

# Query rows per chunk: one SmolLM2 layer's attention at 512 tokens, forward and backward on 2 EPYC
# cores, took 9.8 ms at 128 rows, 10.2 at 64, 11.5 at 256, 15.3 unchunked and 18.6 through SDPA
# (benchmarks/results/cpu/attention_chunks_smollm2_epyc.txt).
CHUNK_ROWS = 128
IMPLEMENTATION = "lowrank_cpu_steering"
_FALLBACK_KWARGS = ("softcap", "sliding_window", "s_aux", "position_bias", "output_attentions")


@functools.cache
def _upper(size: int) -> torch.Tensor:
    """The causal mask of a square diagonal block: True above the diagonal."""
    return torch.ones(size, size, dtype=torch.bool).triu_(1)


def _chunks(length: int) -> list[tuple[int, int]]:
    return [(start, min(start + CHUNK_ROWS, length)) for start in range(0, length, CHUNK_ROWS)]


class _CausalAttention(torch.autograd.Function):
    """``softmax(q kᵀ · scale, causal) v`` for ``q [B, H, S, D]``, ``k, v [B, KV, S, D]`` (H a multiple of KV)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        batch, heads, length, dim = q.shape
        kv = k.shape[1]
        groups = heads // kv
        queries = (q * scale).reshape(batch * kv, groups, length, dim)
        keys, values = k.reshape(batch * kv, length, dim), v.reshape(batch * kv, length, dim)
        out = q.new_empty(batch * kv, groups, length, dim)
        saved, ctx.chunks = [], _chunks(length)  # the backward pass walks the forward's chunks
        for start, end in ctx.chunks:
            rows = queries[:, :, start:end].reshape(batch * kv, groups * (end - start), dim)
            scores = torch.bmm(rows, keys[:, :end].transpose(1, 2)).view(batch * kv, groups, end - start, end)
            scores[..., start:].masked_fill_(_upper(end - start), float("-inf"))
            probs = torch.softmax(scores, -1).view(batch * kv, groups * (end - start), end)
            out[:, :, start:end] = torch.bmm(probs, values[:, :end]).view(batch * kv, groups, end - start, dim)
            saved += [rows, probs]
        ctx.save_for_backward(keys, values, *saved)
        ctx.scale, ctx.shape = scale, (batch, heads, length, dim, kv, groups)
        return out.view(batch, heads, length, dim)

    @staticmethod
    def backward(ctx, grad_out):
        batch, heads, length, dim, kv, groups = ctx.shape
        keys, values, *saved = ctx.saved_tensors
        grad_out = grad_out.to(keys.dtype).reshape(batch * kv, groups, length, dim)
        grad_q = torch.empty_like(grad_out)
        grad_k = keys.new_zeros(batch * kv, length, dim, dtype=torch.float32)
        grad_v = torch.zeros_like(grad_k)
        for (start, end), rows, probs in zip(ctx.chunks, saved[::2], saved[1::2]):
            grad_rows = grad_out[:, :, start:end].reshape(batch * kv, groups * (end - start), dim)
            grad_v[:, :end] += torch.bmm(probs.transpose(1, 2), grad_rows)
            grad_probs = torch.bmm(grad_rows, values[:, :end].transpose(1, 2))
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_q[:, :, start:end] = torch.bmm(grad_scores, keys[:, :end]).view(batch * kv, groups, end - start, dim)
            grad_k[:, :end] += torch.bmm(grad_scores.transpose(1, 2), rows)
        return (grad_q.mul_(ctx.scale).view(batch, heads, length, dim),
                grad_k.to(keys.dtype).view(batch, kv, length, dim), grad_v.to(keys.dtype).view(batch, kv, length, dim),
                None)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``q [B, H, S, D]`` over ``k, v [B, KV, S, D]`` in bfloat16 (the module
    docstring); the result ``[B, H, S, D]``."""
    if q.shape[1] % k.shape[1] or k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs q [B, H, S, D] and k, v [B, KV, S, D] with H a multiple of KV, "
                         f"got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    return _CausalAttention.apply(*(t.to(torch.bfloat16) for t in (q, k, v)), scale)


def _fast_path(query, key, attention_mask, dropout, is_causal, module, kwargs) -> bool:
    return (query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and attention_mask is None and not dropout
            and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
            and query.shape[2] == key.shape[2] > 1 and not any(kwargs.get(name) for name in _FALLBACK_KWARGS))


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs):
    """transformers' attention interface: :func:`causal_attention` where it applies, else SDPA's."""
    if not _fast_path(query, key, attention_mask, dropout, is_causal, module, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return causal_attention(query, key, value, scale).transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    """Name :func:`_attention` to transformers, with the masks SDPA gets (none for a full window).
    Not at import: transformers' model code is heavy to import (and imports Triton's language,
    which must come after any choice of Triton's interpreter)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def _config(module: nn.Module):
    return next((m.config for m in module.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")),
                None)


@contextlib.contextmanager
def steering_attention(module: nn.Module, compute_dtype: str) -> Iterator[None]:
    """While it lasts, ``module``'s attention (a model's or a block's: they share the model's config)
    runs through :func:`causal_attention` where the module docstring says, if it ran through SDPA
    and ``compute_dtype`` is bfloat16; otherwise nothing changes."""
    config = _config(module)
    if compute_dtype != "bfloat16" or config is None or config._attn_implementation != "sdpa":
        yield
        return
    _register()
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
