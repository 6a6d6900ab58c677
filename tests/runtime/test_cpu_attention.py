"""The steering passes' CPU attention against float64 SDPA, and its switch on a real (tiny) model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowrank_infer.cpu_attention as cpu_attention
from lowrank_infer.cpu_attention import causal_attention, steering_attention
from tiny_models import tiny_model


def _reference(q, k, v, scale):
    """Float64 causal attention, the key/value heads repeated for each group of query heads."""
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          is_causal=True, scale=scale)


def _relative(a, b):
    """``‖a − b‖ / ‖b‖``, and 0 where both are 0 (a lone token's query gets no gradient)."""
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("length", [1, 5, 16, 37])
def test_values_and_gradients_match_float64(monkeypatch, length):
    # Chunks of 8 rows: 37 tokens make four whole chunks and a short last one.
    monkeypatch.setattr(cpu_attention, "CHUNK_ROWS", 8)
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, heads, length, 16, generator=gen).to(torch.bfloat16) for heads in (6, 2, 2))
    grad_out = torch.randn(2, 6, length, 16, generator=gen).to(torch.bfloat16)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    causal_attention(*inputs, 0.3).backward(grad_out)
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    expected = _reference(*wide, 0.3)
    expected.backward(grad_out.double())
    assert _relative(causal_attention(q, k, v, 0.3), expected) < 1e-2
    for got, want in zip(inputs, wide):
        assert got.grad.dtype == torch.bfloat16
        assert _relative(got.grad, want.grad) < 2e-2


def test_bad_shapes_are_refused():
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple of KV"):
        causal_attention(q, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 1.0)


def _spy(monkeypatch) -> list[int]:
    calls = []
    original = cpu_attention.causal_attention
    monkeypatch.setattr(cpu_attention, "causal_attention", lambda *a: calls.append(1) or original(*a))
    return calls


def _loss(model, ids, **kwargs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, **kwargs).logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_a_model_trains_through_it_as_through_sdpa(monkeypatch):
    """A bfloat16-autocast pass of a tiny GQA Llama: the same loss and gradients as SDPA's (to
    bfloat16 precision), one call per layer, and the model's own attention back afterwards."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    calls = _spy(monkeypatch)
    grads = []
    for fast in (False, True):
        model.zero_grad()
        with steering_attention(model, "bfloat16" if fast else "float32"):
            loss = _loss(model, ids)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        if not fast:
            sdpa_loss = loss.item()
    assert len(calls) == model.config.num_hidden_layers
    assert loss.item() == pytest.approx(sdpa_loss, rel=2e-2)
    assert _relative(grads[1], grads[0].double()) < 5e-2
    assert model.config._attn_implementation == "sdpa"


def test_a_padding_mask_goes_to_sdpa(monkeypatch):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    calls = _spy(monkeypatch)
    with torch.no_grad():
        expected = _loss(model, ids, attention_mask=mask)
        with steering_attention(model, "bfloat16"):
            got = _loss(model, ids, attention_mask=mask)
    assert not calls
    assert got.item() == expected.item()


def test_outside_autocast_nothing_changes(monkeypatch):
    """Evaluation runs in the model's dtype: inside the switch but without autocast, SDPA computes
    exactly as before."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    calls = _spy(monkeypatch)
    with torch.no_grad():
        expected = model(ids).logits
        with steering_attention(model, "bfloat16"):
            got = model(ids).logits
    assert not calls
    assert torch.equal(got, expected)


def test_every_pass_that_steers_runs_through_it_in_bfloat16(monkeypatch):
    """The dense targets, healing, block refinement and ARA's mask training, each asked for
    bfloat16: their attention goes through :func:`causal_attention`, and the model's own comes back."""
    import copy

    from lowrank_infer import UniformConfig, compress
    from lowrank_infer.allocation import ARAConfig, ara_plan
    from lowrank_infer.calibration import block_stream, run_block
    from lowrank_infer.compensation import refit
    from lowrank_infer.compress import analyze
    from lowrank_infer.healing import HealConfig, heal, teacher_targets
    from lowrank_infer.refinement import BlockBatches, Factored, RefineConfig, refine_block
    from lowrank_infer.structure import replace_module

    dense = tiny_model("llama")
    ids = torch.randint(3, 128, (8, 24), generator=torch.Generator().manual_seed(3))
    calls = _spy(monkeypatch)
    layers = dense.config.num_hidden_layers

    train, held = (teacher_targets(dense, part, batch_size=4, compute_dtype="bfloat16") for part in (ids[:4], ids[4:]))
    assert len(calls) == 2 * layers
    compressed = copy.deepcopy(dense)
    compress(compressed, UniformConfig(keep=0.3, whiten=False), progress=False)
    calls.clear()
    heal(compressed, train, held, HealConfig(steps=2, lr=1e-3, eval_every=1, compute_dtype="bfloat16"))
    assert calls

    with torch.no_grad(), block_stream(dense, ids, batch_size=4, device="cpu") as stream:
        block, batches = copy.deepcopy(stream.blocks[0]), stream.calls[0]
        targets = run_block(stream.blocks[0], batches, stream.hidden)
        inputs = stream.hidden
    factored = {}
    for name, linear in list(block.named_modules()):
        if isinstance(linear, torch.nn.Linear):
            gram = torch.eye(linear.in_features, dtype=torch.float64)
            factored[name] = Factored(linear, *refit(linear.weight, gram, gram, 4, ridge=1e-6))
            replace_module(block, name, factored[name])
    calls.clear()
    refine_block(block, factored, BlockBatches(batches[:1], inputs[:1], targets[:1]),
                 BlockBatches(batches[1:], inputs[1:], targets[1:]),
                 RefineConfig(steps=1, lr=1e-3, eval_every=1, compute_dtype="bfloat16"))
    assert calls

    calls.clear()
    _, spectra, _ = analyze(dense, UniformConfig(keep=0.5), calib_ids=ids, progress=False)
    ara_plan(dense, spectra, ids,
             ARAConfig(keep=0.5, steps=2, samples=4, seq_len=16, batch_size=2, compute_dtype="bfloat16"), progress=False)
    assert calls
    assert dense.config._attn_implementation == compressed.config._attn_implementation == "sdpa"
