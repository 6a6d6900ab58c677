"""ARA: the staircase mask, the straight-through gradient, training, finalization, restoration."""

from __future__ import annotations

import pytest
import torch
from allocation_helpers import ara_cap, decay_spectrum, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_infer.allocation import ARAConfig, ARATrainingError, PlanError, RankPlan, ara_plan
from lowrank_infer.allocation.ara import _candidates, _init_logits, _MaskedLinear, _staircase
from lowrank_infer.factorize import plain_svd
from lowrank_infer.structure import target_linears

FAST = {"steps": 2, "samples": 4, "seq_len": 16, "batch_size": 2}


def _ara(model, spectra, ids, keep, model_id="", **settings):
    """ARA with the fast settings, overridden by ``settings``."""
    return ara_plan(model, spectra, ids, ARAConfig(keep=keep, **{**FAST, **settings}), model_id=model_id,
                    progress=False)


def _masked(m: int = 48, n: int = 40, fraction: float = 0.5, seed: int = 0) -> _MaskedLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(n, m)
    return _MaskedLinear(linear, plain_svd(linear.weight, max_rank=ara_cap(m, n)), fraction)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k_max=st.integers(1, 300), scale=st.floats(0.1, 20))
def test_soft_mask_is_monotone(seed, k_max, scale):
    logits = torch.randn(101, generator=torch.Generator().manual_seed(seed)) * scale
    soft = logits.softmax(-1) @ _staircase(100, k_max)
    assert soft.shape == (k_max,)
    assert (soft[1:] <= soft[:-1] + 1e-6).all()
    assert (soft >= -1e-6).all() and (soft <= 1 + 1e-6).all()


@pytest.mark.parametrize("target", [0.01, 0.2, 0.5, 0.667, 0.9, 0.99])
def test_initial_expected_fraction_matches_target(target):
    assert float(_init_logits(target).softmax(-1).double() @ _candidates()) == pytest.approx(target, abs=1e-4)


def test_straight_through_gradient_reaches_the_logits():
    layer = _masked()
    layer(torch.randn(5, 40)).square().sum().backward()
    assert layer.logits.grad is not None
    assert torch.isfinite(layer.logits.grad).all() and layer.logits.grad.abs().sum() > 0


def test_forward_uses_the_hard_mask():
    layer = _masked(fraction=0.3)
    x = torch.randn(3, 40)
    rank = round(0.3 * layer.k_max)
    expected = x @ layer.right[:, :rank] @ layer.left[:, :rank].T + layer.linear.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dense_past_break_even():
    layer = _masked(fraction=1.0)  # rank ≈ k_max, about 1.2× break-even
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), layer.linear(x))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("keep", [0.4, 0.8])
def test_budget_and_restoration_on_tiny_model(tiny_model_and_spectra, keep):
    model, ids, spectra = tiny_model_and_spectra
    before = _logits(model, ids)
    modules = dict(target_linears(model))
    flags = [p.requires_grad for p in model.parameters()]
    plan = _ara(model, spectra, ids, keep, model_id="tiny")
    assert plan.keep_achieved == pytest.approx(keep, abs=0.005)
    assert plan.keep_achieved <= keep + 1e-12
    assert plan.method == "ara" and plan.model == "tiny" and plan.params["steps"] == 2
    assert all(layer.rank is None or layer.rank >= 1 for layer in plan.layers)
    assert target_linears(model) == modules
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)


def test_json_round_trip(tiny_model_and_spectra, tmp_path):
    model, ids, spectra = tiny_model_and_spectra
    plan = _ara(model, spectra, ids, 0.6, multiple_of=2)
    assert all(layer.rank is None or layer.rank % 2 == 0 for layer in plan.layers)
    plan.save(tmp_path / "ara.json")
    loaded = RankPlan.load(tmp_path / "ara.json")
    assert loaded.ranks == plan.ranks and loaded.params == plan.params and loaded.method == "ara"


def test_keep_one_is_all_dense(tiny_model_and_spectra):
    model, ids, spectra = tiny_model_and_spectra
    assert all(rank is None for rank in _ara(model, spectra, ids, 1.0).ranks.values())


def test_layer_with_large_truncation_error_returns_to_dense():
    # Every linear is rank 2 except one orthogonal (flat-spectrum) layer: keeping it low-rank
    # saves parameters but loses most of it, so guidance and the LM loss make it dense.
    model = tiny_llama(seed=3)
    generator = torch.Generator().manual_seed(0)
    flat = "model.layers.1.mlp.down_proj"
    linears = target_linears(model)
    with torch.no_grad():
        for name, linear in linears.items():
            m, n = linear.weight.shape
            if name == flat:
                linear.weight.copy_(torch.linalg.qr(torch.randn(n, m, generator=generator))[0].T)
            else:
                low = torch.randn(m, 2, generator=generator) @ torch.randn(2, n, generator=generator)
                linear.weight.copy_(low / n**0.5)
    spectra = {name: plain_svd(l.weight, max_rank=ara_cap(*l.weight.shape)) for name, l in linears.items()}
    ids = torch.randint(0, 128, (8, 32), generator=generator)
    plan = _ara(model, spectra, ids, 0.5, steps=40, lr=0.1, batch_size=4, samples=32, seq_len=128)
    assert plan[flat].rank is None
    assert sum(layer.rank is None for layer in plan.layers) == 1
    assert plan.keep_achieved == pytest.approx(0.5, abs=0.005)


def test_nan_loss_raises_with_last_good_plan():
    model = tiny_llama(seed=4)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    linears = target_linears(model)
    spectra = {name: plain_svd(l.weight, max_rank=ara_cap(*l.weight.shape)) for name, l in linears.items()}
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(ARATrainingError, match="NaN|nan") as caught:
        _ara(model, spectra, ids, 0.5)
    assert isinstance(caught.value, ValueError) and caught.value.step == 0
    good = caught.value.last_good_plan
    assert good.method == "ara" and good.keep_achieved == pytest.approx(0.5, abs=0.005)
    assert target_linears(model) == linears  # restored on error too


def test_non_finite_update_raises_with_last_good_plan(tiny_model_and_spectra):
    model, ids, spectra = tiny_model_and_spectra
    modules = dict(target_linears(model))
    with pytest.raises(ARATrainingError, match="non-finite") as caught:
        config = ARAConfig(keep=0.5, **FAST)
        object.__setattr__(config, "lr", float("inf"))  # past validation: reach the training guard
        ara_plan(model, spectra, ids, config, progress=False)
    assert caught.value.last_good_plan.keep_achieved == pytest.approx(0.5, abs=0.005)
    assert target_linears(model) == modules


@pytest.mark.parametrize("keep", [0.0, 1.01, float("nan")])
def test_bad_keep(tiny_model_and_spectra, keep):
    model, ids, spectra = tiny_model_and_spectra
    with pytest.raises(PlanError, match="keep"):
        _ara(model, spectra, ids, keep)


def test_bad_spectra(tiny_model_and_spectra):
    model, ids, spectra = tiny_model_and_spectra
    with pytest.raises(ValueError, match="none"):
        _ara(model, {}, ids, 0.5)
    name = next(iter(spectra))
    with pytest.raises(ValueError, match=f"'{name}'.*missing"):
        _ara(model, {**spectra, name: None}, ids, 0.5)
    nan = decay_spectrum(64, 64, 0.9, max_rank=ara_cap(64, 64))
    nan.sigma[3] = float("nan")
    with pytest.raises(ValueError, match=f"'{name}'.*NaN"):
        _ara(model, {**spectra, name: nan}, ids, 0.5)
    with pytest.raises(ValueError, match="'model.layers.7.mlp.up_proj' names no module"):
        _ara(model, {**spectra, "model.layers.7.mlp.up_proj": spectra[name]}, ids, 0.5)
    with pytest.raises(ValueError, match="is 64x64 but its spectrum is 32x64"):
        _ara(model, {**spectra, name: spectra["model.layers.0.self_attn.k_proj"]}, ids, 0.5)
    with pytest.raises(ValueError, match="steps"):
        _ara(model, spectra, ids, 0.5, steps=0)


def test_the_plan_records_the_trained_ratio_the_rescale_and_the_layers_sent_dense(tiny_model_and_spectra):
    from lowrank_infer.allocation.ara import _final_ranks

    _, _, spectra = tiny_model_and_spectra
    names = sorted(spectra)
    headroom = {n: spectra[n].max_rank * (spectra[n].out_features + spectra[n].in_features)
                / (spectra[n].out_features * spectra[n].in_features) for n in names}
    dense = names[:2]  # fraction 1: ratio = headroom > 0.99, sent dense by the threshold
    fractions = {n: 1.0 if n in dense else 0.3 / headroom[n] for n in names}
    size = {n: spectra[n].out_features * spectra[n].in_features for n in names}
    keep, total = 0.5, sum(size.values())
    _, outcome = _final_ranks(spectra, fractions, ARAConfig(keep=keep))
    rest = [n for n in names if n not in dense]
    assert outcome["dense_at_threshold"] == 2
    assert outcome["final_ratio"] == pytest.approx((sum(size[n] for n in dense) + 0.3 * sum(size[n] for n in rest))
                                                   / total, abs=1e-6)
    assert outcome["rescale"] == pytest.approx((keep * total - sum(size[n] for n in dense))
                                               / (0.3 * sum(size[n] for n in rest)), abs=1e-6)


def test_a_trained_plan_carries_its_outcome(tiny_model_and_spectra):
    model, ids, spectra = tiny_model_and_spectra
    params = _ara(model, spectra, ids, 0.6).params
    assert 0 < params["final_ratio"] <= 1 and params["rescale"] > 0
    assert 0 <= params["dense_at_threshold"] <= len(spectra)


def test_the_kl_loss_is_zero_when_every_layer_is_dense_and_matches_a_direct_computation(tiny_model_and_spectra):
    from lowrank_infer.allocation.ara import _data_parallel_loss, _swapped
    from lowrank_infer.distributed import Ranks

    model, ids, spectra = tiny_model_and_spectra
    batch = ids[:2]
    dense = _logits(model, batch)[:, :-1].double().log_softmax(-1)
    for fraction in (1.0, 0.3):
        masked = {name: _MaskedLinear(model.get_submodule(name), s, fraction) for name, s in spectra.items()}
        with _swapped(model, masked), torch.no_grad():
            loss = _data_parallel_loss(model, list(masked.values()), batch, Ranks(), "cpu", "kl")
            student = _logits(model, batch)[:, :-1].double().log_softmax(-1)
        want = (dense.exp() * (dense - student)).sum(-1).mean()
        assert float(loss) == pytest.approx(float(want), rel=1e-3, abs=1e-6)
        assert (float(loss) < 1e-5) == (fraction == 1.0)


def test_ara_trains_on_the_kl_loss_and_refuses_an_unknown_one(tiny_model_and_spectra):
    model, ids, spectra = tiny_model_and_spectra
    plan = _ara(model, spectra, ids, 0.6, loss="kl")
    assert plan.params["loss"] == "kl" and plan.keep_achieved == pytest.approx(0.6, abs=0.005)
    with pytest.raises(ValueError, match="ARA's loss must be one of ce, kl, got 'mse'"):
        ARAConfig(keep=0.6, loss="mse")


def test_training_rows_are_the_windows_cut_into_pieces_heads_first():
    from lowrank_infer.allocation.ara import _training_ids

    ids = torch.arange(6 * 40).reshape(6, 40)  # 2 pieces of 16 per row, 8 tokens left over
    rows = _training_ids(ids, ARAConfig(samples=100, seq_len=16))
    expected = [ids[r, p * 16:(p + 1) * 16] for p in range(2) for r in range(6)]
    torch.testing.assert_close(rows, torch.stack(expected), rtol=0, atol=0)
    torch.testing.assert_close(_training_ids(ids, ARAConfig(samples=6, seq_len=16)), ids[:, :16], rtol=0, atol=0)
    torch.testing.assert_close(_training_ids(ids, ARAConfig(samples=4, seq_len=64)), ids[:4], rtol=0, atol=0)


def test_the_plan_records_the_pieces_it_trained_on(tiny_model_and_spectra):
    model, ids, spectra = tiny_model_and_spectra  # 8 rows of 32 tokens
    params = _ara(model, spectra, ids, 0.6, samples=100, seq_len=8).params
    assert (params["samples"], params["seq_len"]) == (8 * 4, 8)
