"""D-Rank: effective ranks, the per-type Lagrange split, Q/K → V, budgets and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from allocation_helpers import decay_spectrum, llama_names, sigma_only, spectrum_with

from lowrank_infer.allocation import PlanError, RankPlan, drank_plan, effective_rank
from lowrank_infer.allocation.drank import _move_qk_to_v

KEEPS = [0.3, 0.5, 0.8, 0.95]


def _type_params(plan: RankPlan, kind: str) -> int:
    return sum(layer.params for layer in plan.layers if layer.name.endswith(kind))


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.ones(10)) == pytest.approx(10)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1)
    assert effective_rank(torch.zeros(4)) == 1.0
    assert 1 < effective_rank(0.5 ** torch.arange(20.0)) < 3


def test_effective_rank_and_energy_are_scale_free_even_where_squares_overflow():
    from lowrank_infer.allocation.budget import captured_energy

    sigma = torch.cat([torch.tensor([10.0, 1.0]), torch.ones(30) * 1e-3]).double()
    huge = sigma * 1e199  # σ² would overflow float64
    assert effective_rank(huge) == pytest.approx(effective_rank(sigma), rel=1e-12)
    assert captured_energy(huge) == pytest.approx(captured_energy(sigma), rel=1e-12)


def test_tail_energy_counts_a_rank_rounded_down_to_the_largest_useful_one():
    from lowrank_infer.allocation.drank import _tail_energy
    from lowrank_infer.cost import max_useful_rank

    spectra = {"l0.q_proj": sigma_only(torch.ones(64), 64, 64)}
    top = max_useful_rank(64, 64)  # 31: floor(31.8) is still a low-rank layer of rank 31
    assert _tail_energy(spectra, {"l0.q_proj": top + 0.8}) == pytest.approx(64 - top)
    assert _tail_energy(spectra, {"l0.q_proj": None}) == 0.0


@pytest.mark.parametrize("keep", KEEPS)
def test_budget_on_synthetic_spectra(synthetic_spectra, keep):
    plan = drank_plan(synthetic_spectra, keep)
    assert plan.keep_achieved == pytest.approx(keep, abs=0.005)
    assert plan.keep_achieved <= keep + 1e-12
    assert [layer.name for layer in plan.layers] == list(synthetic_spectra)
    assert all(layer.rank is None or layer.rank >= 1 for layer in plan.layers)


@pytest.mark.parametrize("keep", [0.4, 0.8])
def test_budget_on_tiny_model(tiny_model_and_spectra, keep):
    _, _, spectra = tiny_model_and_spectra
    plan = drank_plan(spectra, keep, model_id="tiny")
    assert plan.keep_achieved == pytest.approx(keep, abs=0.005)
    assert plan.method == "drank" and plan.model == "tiny" and plan.params["beta"] == 0.3


def test_higher_effective_rank_gets_more_rank():
    # One matrix type across depth: the flatter a layer's spectrum, the more rank it gets.
    decays = [0.7, 0.9, 0.97]
    spectra = {f"model.layers.{i}.mlp.up_proj": decay_spectrum(96, 64, d, seed=i) for i, d in enumerate(decays)}
    plan = drank_plan(spectra, 0.4, beta=0.0)
    eranks = [effective_rank(s.sigma) for s in spectra.values()]
    ranks = [layer.rank for layer in plan.layers]
    assert eranks == sorted(eranks) and ranks == sorted(ranks) and ranks[0] < ranks[-1]
    # k ∝ sqrt(erank) within a type of equal shapes.
    assert ranks[2] / ranks[0] == pytest.approx(math.sqrt(eranks[2] / eranks[0]), rel=0.1)


def test_each_type_keeps_its_share(synthetic_spectra):
    plan = drank_plan(synthetic_spectra, 0.5, beta=0.0)
    for kind in ("o_proj", "gate_proj", "up_proj", "down_proj"):
        dense = sum(s.out_features * s.in_features for name, s in synthetic_spectra.items() if name.endswith(kind))
        assert _type_params(plan, kind) / dense == pytest.approx(0.5, abs=0.03)


def test_flat_layer_past_break_even_becomes_dense():
    spectra = {
        "model.layers.0.mlp.down_proj": spectrum_with(torch.ones(64), 64, 160, seed=0),
        **{f"model.layers.{i}.mlp.down_proj": decay_spectrum(64, 160, 0.5, seed=i) for i in (1, 2, 3)},
    }
    plan = drank_plan(spectra, 0.5)
    assert plan["model.layers.0.mlp.down_proj"].rank is None
    assert plan.keep_achieved == pytest.approx(0.5, abs=0.005)


def test_beta_moves_parameters_from_qk_to_v(synthetic_spectra):
    without = drank_plan(synthetic_spectra, 0.5, beta=0.0)
    moved = drank_plan(synthetic_spectra, 0.5, beta=0.3)
    qk_before = _type_params(without, "q_proj") + _type_params(without, "k_proj")
    qk_after = _type_params(moved, "q_proj") + _type_params(moved, "k_proj")
    v_gain = _type_params(moved, "v_proj") - _type_params(without, "v_proj")
    assert qk_after < qk_before and v_gain > 0
    assert v_gain == pytest.approx(qk_before - qk_after, rel=0.1)
    assert moved.keep_achieved == pytest.approx(without.keep_achieved, abs=0.005)
    assert moved.params["beta"] == 0.3


def test_qk_to_v_preserves_the_total_exactly_with_gqa():
    # Q is 64x64, K/V 32x64: a rank of Q costs 128 parameters, one of K/V 96.
    attention = ("q_proj", "k_proj", "v_proj")
    shapes = {name: shape for name, shape in llama_names(2).items() if name.endswith(attention)}
    ranks = {name: 10.0 for name in shapes}
    moved = _move_qk_to_v(shapes, ranks, 0.3)

    def total(r):
        return sum(k * sum(shapes[n]) for n, k in r.items())

    assert total(moved) == pytest.approx(total(ranks))
    for name, k in moved.items():
        assert k == pytest.approx(7.0 if "v_proj" not in name else 10 + (2 * 3 * 128 + 2 * 3 * 96) / 2 / 96)


def test_multiple_of():
    sigma = 0.99 ** torch.arange(384.0)
    big = {f"model.layers.{i}.mlp.up_proj": sigma_only(sigma * (1 + i), 512, 384) for i in range(20)}
    plan = drank_plan(big, 0.6, multiple_of=8)
    assert all(layer.rank is None or layer.rank % 8 == 0 for layer in plan.layers)
    assert plan.keep_achieved == pytest.approx(0.6, abs=0.005)
    assert plan.params["multiple_of"] == 8


def test_json_round_trip(synthetic_spectra, tmp_path):
    plan = drank_plan(synthetic_spectra, 0.6, model_id="synthetic")
    plan.save(tmp_path / "plan.json")
    loaded = RankPlan.load(tmp_path / "plan.json")
    assert loaded.ranks == plan.ranks and loaded.params == plan.params
    assert (loaded.method, loaded.model, loaded.keep_target) == ("drank", "synthetic", 0.6)


def test_keep_one_is_all_dense(synthetic_spectra):
    assert all(rank is None for rank in drank_plan(synthetic_spectra, 1.0).ranks.values())


@pytest.mark.parametrize("keep", [0.0, -0.2, 1.5, float("nan"), "a lot"])
def test_bad_keep(synthetic_spectra, keep):
    with pytest.raises(PlanError, match="keep"):
        drank_plan(synthetic_spectra, keep)


def test_bad_spectra(synthetic_spectra):
    with pytest.raises(ValueError, match="none"):
        drank_plan({}, 0.5)
    with pytest.raises(ValueError, match="'model.layers.9.mlp.up_proj'.*missing"):
        drank_plan({**synthetic_spectra, "model.layers.9.mlp.up_proj": None}, 0.5)
    nan = decay_spectrum(32, 64, 0.9)
    nan.sigma[0] = float("nan")
    with pytest.raises(ValueError, match="'model.layers.9.self_attn.k_proj'.*NaN"):
        drank_plan({**synthetic_spectra, "model.layers.9.self_attn.k_proj": nan}, 0.5)
    with pytest.raises(ValueError, match="beta"):
        drank_plan(synthetic_spectra, 0.5, beta=1.0)


def test_type_falls_back_to_uniform_when_dynamic_loses_more_energy():
    # Layer 0 looks low-rank (one huge direction) but its tail holds far more energy than the
    # flatter, small layer 1: effective ranks would starve it, so the type stays uniform.
    spiky = torch.cat([torch.tensor([1000.0]), torch.ones(255)])
    spectra = {
        "model.layers.0.mlp.up_proj": sigma_only(spiky, 384, 256),
        "model.layers.1.mlp.up_proj": sigma_only(0.01 * 0.99 ** torch.arange(256.0), 384, 256),
    }
    eranks = [effective_rank(s.sigma) for s in spectra.values()]
    assert eranks[0] < eranks[1]
    plan = drank_plan(spectra, 0.5, beta=0.0)
    assert all(abs(rank - 0.5 * 384 * 256 / 640) < 1 for rank in plan.ranks.values())
