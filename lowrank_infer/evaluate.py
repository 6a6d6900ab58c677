"""Perplexity with the standard protocol (GPTQ / SVD-LLM): non-overlapping windows, exp(mean NLL)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["check_seq_len", "mean_nll", "perplexity", "summed_nll"]


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    """Refuse windows longer than the model's position table (``max_position_embeddings``):
    learned position embeddings fail on them with an index error, RoPE models degrade silently."""
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} is longer than the model's {limit} positions "
                         f"(max_position_embeddings); pass --seq-len {limit} or less")


@torch.no_grad()
def summed_nll(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = False,
               desc: str = "perplexity") -> tuple[float, int]:
    """``(Σ next-token NLL, tokens predicted)`` over the rows of ``windows`` ([rows, seq_len]),
    each row scored on its own; a non-finite sum is returned, not raised."""
    device = next(model.parameters()).device
    total, counted = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        counted += target.numel()
    return total, counted


def mean_nll(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over the rows of ``windows`` ([rows, seq_len])."""
    total, tokens = summed_nll(model, windows, batch_size=batch_size)
    return total / tokens


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
    check_seq_len(model, seq_len)
    windows = tokens.numel() // seq_len
    if windows == 0:
        raise ValueError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        windows = min(windows, max_windows)
    data = tokens[: windows * seq_len].view(windows, seq_len)
    start = time.perf_counter()
    total_nll, counted = summed_nll(model, data, batch_size=batch_size, progress=progress)
    if not math.isfinite(total_nll):
        raise ValueError("model produced non-finite logits during evaluation")
    mean_nll = total_nll / counted
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": counted,
        "windows": windows,
        "seq_len": seq_len,
        "seconds": time.perf_counter() - start,
    }
