"""The shared budget repair: exact budgets, valid ranks, multiples, clear errors."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_infer.allocation import PlanError
from lowrank_infer.cost import layer_params, max_useful_rank
from lowrank_infer.allocation.budget import captured_energy, fit_budget, layer_type, spectra_shapes

from allocation_helpers import decay_spectrum, llama_names

SHAPES = llama_names(3)


def _keep(shapes, ranks) -> float:
    return sum(layer_params(*shapes[n], r) for n, r in ranks.items()) / sum(m * n for m, n in shapes.values())


def _value(name: str, rank: int | None) -> float:
    # Diminishing returns that differ by layer, like a real spectrum's captured energy.
    full = 64 if rank is None else rank
    return (1 + zlib.crc32(name.encode()) % 5) * (1 - 0.97**full)


@settings(max_examples=40, deadline=None)
@given(keep=st.floats(0.3, 1.0), start=st.floats(0.0, 1.5), multiple_of=st.sampled_from([1, 2, 4, 8]))
def test_fit_budget_lands_just_under_the_budget(keep, start, multiple_of):
    proposed = {n: max(1, int(start * max_useful_rank(m, k))) for n, (m, k) in SHAPES.items()}
    ranks = fit_budget(SHAPES, proposed, keep, _value, multiple_of=multiple_of)
    achieved = _keep(SHAPES, ranks)
    assert achieved <= keep + 1e-12
    assert keep - achieved <= 0.005
    for name, rank in ranks.items():
        assert rank is None or (rank >= 1 and rank % multiple_of == 0 and rank <= max_useful_rank(*SHAPES[name]))


def _brute_force_fits(shapes, keep, multiple_of) -> bool:
    """Whether any choice of allowed ranks lands within the tolerance under the budget."""
    import itertools

    ladders = [[*range(multiple_of, max_useful_rank(m, n) + 1, multiple_of), None] for m, n in shapes.values()]
    dense = sum(m * n for m, n in shapes.values())
    for choice in itertools.product(*ladders):
        kept = sum(layer_params(*shape, rank) for shape, rank in zip(shapes.values(), choice)) / dense
        if keep - 0.005 <= kept <= keep:
            return True
    return False


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(8, 48), st.integers(8, 48)), min_size=2, max_size=4),
       keep=st.floats(0.3, 0.95), multiple_of=st.sampled_from([4, 8]))
def test_fit_budget_finds_a_plan_whenever_one_exists(sizes, keep, multiple_of):
    """Coarse rungs on small layers: greedy steps and trades can stall; the knapsack fallback
    must still find a plan within the tolerance whenever brute force says one exists."""
    shapes = {f"model.layers.{i}.mlp.up_proj": size for i, size in enumerate(sizes)}
    start = {name: multiple_of for name in shapes}
    if not _brute_force_fits(shapes, keep, multiple_of):
        with pytest.raises(PlanError):
            fit_budget(shapes, start, keep, _value, multiple_of=multiple_of)
        return
    ranks = fit_budget(shapes, start, keep, _value, multiple_of=multiple_of)
    assert keep - 0.005 <= _keep(shapes, ranks) <= keep + 1e-12


def test_fit_budget_is_tight_without_rounding():
    ranks = fit_budget(SHAPES, {n: 1 for n in SHAPES}, 0.6, _value)
    # Every low-rank step costs at most 224 parameters out of ~258k.
    assert 0.6 - _keep(SHAPES, ranks) < 224 / sum(m * n for m, n in SHAPES.values())


def test_fit_budget_keep_one_is_all_dense():
    ranks = fit_budget(SHAPES, {n: 3 for n in SHAPES}, 1.0, _value)
    assert all(r is None for r in ranks.values())


def test_fit_budget_respects_caps():
    caps = {n: 5 for n in SHAPES}
    ranks = fit_budget(SHAPES, {n: 50 for n in SHAPES}, 0.05, _value, caps=caps)
    assert all(r is None or r <= 5 for r in ranks.values())


def test_fit_budget_prefers_higher_marginal_value():
    shapes = {"a": (64, 64), "b": (64, 64)}
    ranks = fit_budget(shapes, {"a": 1, "b": 1}, 0.5, lambda n, r: (10 if n == "a" else 1) * math.log1p(r or 64))
    assert ranks["a"] > ranks["b"]


def test_fit_budget_rejects_impossible_budgets():
    with pytest.raises(PlanError, match="smallest plan"):
        fit_budget(SHAPES, {n: 1 for n in SHAPES}, 0.001, _value)
    with pytest.raises(PlanError, match="multiple_of"):
        fit_budget(SHAPES, {n: 1 for n in SHAPES}, 0.5, _value, multiple_of=0)


def test_captured_energy_and_layer_type():
    energy = captured_energy(torch.tensor([2.0, 1.0, 1.0]))
    assert energy == pytest.approx([0.0, 4 / 6, 5 / 6, 1.0])
    assert captured_energy(torch.zeros(2)) == [1.0, 1.0, 1.0]
    assert layer_type("model.layers.3.self_attn.q_proj") == "q_proj"


def test_spectra_shapes_rejects_bad_spectra():
    good = decay_spectrum(8, 6, 0.9)
    assert spectra_shapes({"a": good}) == {"a": (8, 6)}
    with pytest.raises(ValueError, match="none"):
        spectra_shapes({})
    with pytest.raises(ValueError, match="'layer.b'.*missing"):
        spectra_shapes({"a": good, "layer.b": None})
    bad = decay_spectrum(8, 6, 0.9)
    bad.sigma[2] = float("nan")
    with pytest.raises(ValueError, match="'layer.c'.*NaN"):
        spectra_shapes({"a": good, "layer.c": bad})
