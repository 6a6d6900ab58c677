"""D-Rank's β chosen on calibration data: the pick is the candidate with the lowest loss, model intact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lowrank_infer.allocation import drank_auto_plan, drank_plan
from lowrank_infer.compress import make_plan
from lowrank_infer.module import LowRankLinear

CANDIDATES = (0.0, 0.15, 0.3)


def _reference_loss(model, spectra, ids, plan) -> float:
    """Loss of a deep copy compressed by hand (float64 logits): independent of plan_applied."""
    lm = copy.deepcopy(model).eval()
    for layer in plan.layers:
        if layer.rank is not None:
            U, V = spectra[layer.name].factors(layer.rank)
            parent, _, child = layer.name.rpartition(".")
            old = lm.get_submodule(parent).get_submodule(child)
            setattr(lm.get_submodule(parent), child, LowRankLinear.from_factors(U, V, old.bias))
    with torch.no_grad():
        logits = lm(input_ids=ids, use_cache=False).logits[:, :-1].double()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize("keep", [0.4, 0.7])
def test_picks_the_candidate_with_the_lowest_loss(tiny_model_and_spectra, keep):
    model, ids, spectra = tiny_model_and_spectra
    plan = drank_auto_plan(model, spectra, ids, keep, candidates=CANDIDATES, samples=4, progress=False)
    losses = {b: _reference_loss(model, spectra, ids[:4], drank_plan(spectra, keep, beta=b)) for b in CANDIDATES}
    best = min(losses, key=losses.get)
    assert plan.params["beta"] == best
    assert plan.params["beta_selection"]["calibration_loss"] == pytest.approx([losses[b] for b in CANDIDATES], rel=1e-4)
    assert [l.rank for l in plan.layers] == [l.rank for l in drank_plan(spectra, keep, beta=best).layers]
    assert abs(plan.keep_achieved - keep) <= 0.005 * keep


def test_model_is_left_unchanged(tiny_model_and_spectra):
    model, ids, spectra = tiny_model_and_spectra
    with torch.no_grad():
        before = model(input_ids=ids[:2]).logits
    modules = dict(model.named_modules())
    drank_auto_plan(model, spectra, ids, 0.5, candidates=CANDIDATES, samples=2, progress=False)
    with torch.no_grad():
        after = model(input_ids=ids[:2]).logits
    assert torch.equal(before, after)
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in modules.items()}


def test_make_plan_defaults_to_auto_and_honours_a_fixed_beta(tiny_model_and_spectra):
    model, ids, spectra = tiny_model_and_spectra
    shapes = {name: (s.out_features, s.in_features) for name, s in spectra.items()}
    common = dict(shapes=shapes, spectra=spectra, model=model, calib_ids=ids, progress=False)
    assert "beta_selection" in make_plan("drank", 0.6, **common).params
    fixed = make_plan("drank", 0.6, params={"beta": 0.2}, **common)
    assert fixed.params["beta"] == 0.2 and "beta_selection" not in fixed.params
    assert make_plan("drank", 0.6, shapes=shapes, spectra=spectra, progress=False).params["beta"] == 0.3


def test_bad_input(tiny_model_and_spectra):
    model, ids, spectra = tiny_model_and_spectra
    with pytest.raises(ValueError, match="at least one beta"):
        drank_auto_plan(model, spectra, ids, 0.6, candidates=(), progress=False)
    with pytest.raises(ValueError, match="calib_ids"):
        drank_auto_plan(model, spectra, ids[:, :1], 0.6, progress=False)
    with pytest.raises(ValueError, match="beta"):
        drank_auto_plan(model, spectra, ids, 0.6, candidates=(0.0, 1.5), progress=False)


def test_non_finite_loss_is_an_error_and_the_model_comes_back(tiny_model_and_spectra):
    model, ids, spectra = tiny_model_and_spectra
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.get_input_embeddings().weight.fill_(float("nan"))
    kinds = {n: type(m) for n, m in broken.named_modules()}
    with pytest.raises(ValueError, match="calibration loss is nan"):
        drank_auto_plan(broken, spectra, ids, 0.6, candidates=CANDIDATES, samples=2, progress=False)
    assert {n: type(m) for n, m in broken.named_modules()} == kinds
