"""Perplexity and loss against a float64 computation by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_infer.evaluate import check_seq_len, mean_nll, perplexity, summed_nll

from tiny_models import tiny_model

TOKENS = torch.randint(3, 128, (100,), generator=torch.Generator().manual_seed(7))


def _nll_by_hand(model, windows: torch.Tensor) -> tuple[float, int]:
    """Σ −log p(next token) in float64, one window and one position at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=row[None]).logits[0].double()
            logp = logits.log_softmax(-1)
            for t in range(row.numel() - 1):
                total -= float(logp[t, row[t + 1]])
                count += 1
    return total, count


def test_perplexity_is_exp_of_the_mean_nll_over_non_overlapping_windows():
    model = tiny_model("llama").eval()
    result = perplexity(model, TOKENS, seq_len=16, max_windows=4, batch_size=3, progress=False)
    total, count = _nll_by_hand(model, TOKENS[:64].view(4, 16))
    assert result["windows"] == 4 and result["tokens"] == count == 60
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)


def test_all_windows_by_default_and_the_tail_is_dropped():
    model = tiny_model("llama").eval()
    assert perplexity(model, TOKENS, seq_len=30, progress=False)["windows"] == 3  # 100 // 30


def test_summed_and_mean_nll_agree_with_the_hand_computation():
    model = tiny_model("qwen2").eval()
    windows = TOKENS[:48].view(3, 16)
    total, count = _nll_by_hand(model, windows)
    got_total, got_count = summed_nll(model, windows, batch_size=2)
    assert got_count == count and got_total == pytest.approx(total, rel=1e-5)
    assert mean_nll(model, windows) == pytest.approx(total / count, rel=1e-5)


def test_bad_windows_are_refused():
    model = tiny_model("llama")  # 256 positions
    with pytest.raises(ValueError, match="seq_len 300 is longer than the model's 256 positions"):
        check_seq_len(model, 300)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        perplexity(model, TOKENS, seq_len=1, progress=False)
    with pytest.raises(ValueError, match="fewer than one window of 200"):
        perplexity(model, TOKENS, seq_len=200, progress=False)
    with pytest.raises(ValueError, match="max_windows must be >= 1"):
        perplexity(model, TOKENS, seq_len=16, max_windows=0, progress=False)


def test_non_finite_logits_are_an_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        perplexity(model, TOKENS, seq_len=16, progress=False)
