"""Sampling text from a causal LM, fast enough on a CPU to make calibration windows.

``model.generate`` spends most of a CPU step outside the model: nucleus sampling sorts the whole
vocabulary (about 60 ms for 32 rows of SmolLM2's 49k tokens on 2 cores) and draws from all of it,
and its growing key/value cache is copied at every step. Here the cache is allocated once for the
whole window, and the nucleus is found among the ``_CANDIDATES`` most likely tokens (a partial
top-k, about seven times cheaper than the sort), falling back to the full sort for the rows whose
nucleus is wider (only those rows: right after the start token most rows of a batch are), so the
distribution sampled is exactly nucleus sampling's.
"""

from __future__ import annotations

import inspect

import torch
from transformers import StaticCache

__all__ = ["nucleus_sample", "sample_windows"]

_CANDIDATES = 1024


def nucleus_sample(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[rows, 1]`` tokens drawn from the smallest set of most likely tokens whose probability
    reaches ``top_p`` (the most likely token always qualifies)."""
    probs = logits.float().softmax(-1)
    top, index = probs.topk(min(_CANDIDATES, probs.shape[-1]), dim=-1)
    tokens = _draw(top, index, top_p)
    wide = ((top.sum(-1) - top[:, -1]) < top_p).nonzero().flatten()  # nucleus wider than the candidates
    if len(wide):
        tokens[wide] = _draw(*probs[wide].sort(-1, descending=True), top_p)
    return tokens


def _draw(top: torch.Tensor, index: torch.Tensor, top_p: float) -> torch.Tensor:
    """One token per row from probabilities ``top`` (descending) of tokens ``index``, within the nucleus."""
    mass_before = top.cumsum(-1) - top
    weights = top.masked_fill(mass_before >= top_p, 0.0)
    return index.gather(-1, torch.multinomial(weights, 1))


@torch.no_grad()
def sample_windows(model, start: int, rows: int, seq_len: int, *, top_p: float, banned: list[int]) -> torch.Tensor:
    """``[rows, seq_len]`` token ids sampled by ``model`` after ``start``, with the ``banned``
    tokens (end of text) never drawn, so that every window is whole."""
    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=seq_len)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    token = torch.full((rows, 1), start, dtype=torch.long, device=device)
    tokens = [token]
    for position in range(seq_len - 1):
        logits = model(token, position_ids=torch.full_like(token, position), use_cache=True,
                       **{cache_arg: cache}).logits[:, -1]
        logits[:, banned] = float("-inf")
        token = nucleus_sample(logits, top_p)
        tokens.append(token)
    return torch.cat(tokens, dim=1).cpu()
