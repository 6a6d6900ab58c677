"""Perplexity with the standard protocol (GPTQ / SVD-LLM): non-overlapping windows, exp(mean NLL)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["check_seq_len", "perplexity"]


def check_seq_len(config, seq_len: int) -> None:
    """Refuse windows longer than the model's position table (``max_position_embeddings``):
    learned position embeddings fail on them with an index error, RoPE models degrade silently."""
    limit = getattr(config, "max_position_embeddings", None) if config is not None else None
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} is longer than the model's {limit} positions "
                         f"(max_position_embeddings); pass --seq-len {limit} or less")


def _check_positions(model: nn.Module, seq_len: int) -> None:
    config = getattr(model, "config", None)
    check_seq_len(config.get_text_config() if hasattr(config, "get_text_config") else config, seq_len)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on a token stream cut into non-overlapping ``seq_len`` windows.

    Each window is scored on its own (no context carried over); the result is
    ``exp(Σ NLL / Σ predicted tokens)`` over the first ``max_windows`` windows.

    Args:
        model: a causal LM returning ``.logits``.
        tokens: ``[N]`` token ids of the whole evaluation text.
        seq_len: window length.
        max_windows: evaluate only the first windows (all when None).
        batch_size: windows per forward pass.
        progress: show a progress bar.

    Returns:
        ``{"perplexity", "nll", "tokens", "windows", "seq_len", "seconds"}``.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a window predicts seq_len - 1 tokens), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_positions(model, seq_len)
    windows = tokens.numel() // seq_len
    if windows == 0:
        raise ValueError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        windows = min(windows, max_windows)
    data = tokens[: windows * seq_len].view(windows, seq_len)
    device = next(model.parameters()).device
    total_nll, counted = 0.0, 0
    start = time.perf_counter()
    for batch in tqdm(data.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise ValueError("model produced non-finite logits during evaluation")
        total_nll += float(nll)
        counted += batch[:, 1:].numel()
    mean_nll = total_nll / counted
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": counted,
        "windows": windows,
        "seq_len": seq_len,
        "seconds": time.perf_counter() - start,
    }
