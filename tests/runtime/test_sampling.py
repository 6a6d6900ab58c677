"""Sampling calibration windows: nucleus sampling's support, and the cached decoding loop
against a full forward pass at every step."""

from __future__ import annotations

import pytest
import torch

from lowrank_infer.sampling import nucleus_sample, sample_windows
from tiny_models import ARCHS, tiny_model


def _nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """float64 reference: the most likely tokens, in order, until their mass reaches top_p."""
    order = probs.double().argsort(descending=True).tolist()
    chosen, mass = set(), 0.0
    for token in order:
        if mass >= top_p:
            break
        chosen.add(token)
        mass += float(probs[token])
    return chosen


@pytest.mark.parametrize("vocab, top_p", [(50, 0.9), (3000, 0.95)])
def test_nucleus_draws_exactly_the_nucleus(vocab, top_p):
    """A peaked row (nucleus among the top candidates) and a flat 3000-token row whose nucleus
    is wider than them (the full-sort path): every draw is in the nucleus, the peaked row's most
    likely token is drawn, and the flat row's draws cover most of its nucleus."""
    torch.manual_seed(0)
    peaked = torch.randn(vocab) * 3
    flat = torch.randn(vocab) * 0.01
    logits = torch.stack([peaked, flat])
    draws = torch.cat([nucleus_sample(logits, top_p) for _ in range(400)], dim=1)
    for row, name in enumerate(("peaked", "flat")):
        nucleus = _nucleus(logits[row].softmax(-1), top_p)
        seen = set(draws[row].tolist())
        assert seen <= nucleus, f"{name}: drew outside the nucleus"
    assert int(peaked.argmax()) in set(draws[0].tolist())
    # A nearly uniform nucleus: 400 draws cover most of it (all of a small one).
    assert len(set(draws[1].tolist())) > 0.8 * min(len(_nucleus(flat.softmax(-1), top_p)), 400)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_equals_a_full_forward_at_every_step(arch):
    """With a nucleus of one token the loop is greedy; each token must be the argmax of the model
    run on the whole prefix without a cache (past the sliding windows of the models that have them)."""
    model = tiny_model(arch)
    banned = [2]
    ids = sample_windows(model, 1, 3, 24, top_p=1e-9, banned=banned)
    assert ids.shape == (3, 24) and (ids[:, 0] == 1).all()
    with torch.no_grad():
        for position in range(1, 24):
            logits = model(ids[:, :position]).logits[:, -1]
            logits[:, banned] = float("-inf")
            assert torch.equal(ids[:, position], logits.argmax(-1)), f"{arch}: step {position}"
