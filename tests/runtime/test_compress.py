"""The pipeline: configs meet plans, calibration is demanded when needed, D-Rank's β is scored."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lowrank_infer.allocation import ARAConfig, DRankConfig, UniformConfig, drank_plan, uniform_plan
from lowrank_infer.compress import SCORE_WINDOWS, analyze, compress, config_for
from lowrank_infer.module import LowRankLinear
from lowrank_infer.structure import target_shapes

from tiny_models import tiny_model

CANDIDATES = (0.0, 0.15, 0.3)
IDS = torch.randint(3, 128, (10, 24), generator=torch.Generator().manual_seed(5))


def _reference_loss(model, spectra, ids, plan) -> float:
    """Loss of a deep copy compressed by hand, float64 logits: independent of the pipeline's scoring."""
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
def test_drank_auto_picks_the_beta_with_the_lowest_loss(keep):
    model = tiny_model("llama").eval()
    plan, spectra, _ = analyze(model, DRankConfig(keep=keep, candidates=CANDIDATES), calib_ids=IDS, progress=False)
    scored = IDS[:SCORE_WINDOWS]
    losses = {b: _reference_loss(model, spectra, scored, drank_plan(spectra, keep, beta=b)) for b in CANDIDATES}
    best = min(losses, key=losses.get)
    assert plan.params["beta"] == best
    assert plan.params["beta_selection"]["calibration_loss"] == pytest.approx([losses[b] for b in CANDIDATES], rel=1e-4)
    assert plan.ranks == drank_plan(spectra, keep, beta=best).ranks


def test_ara_orders_keeps_the_row_order_whose_plan_has_the_lowest_loss():
    from lowrank_infer.allocation import ara_plan

    model = tiny_model("llama").eval()
    fast = {"steps": 6, "samples": 8, "seq_len": 12, "lr": 0.5}
    plan, spectra, _ = analyze(model, ARAConfig(keep=0.5, orders=3, seed=4, **fast), calib_ids=IDS, progress=False)
    each = {s: ara_plan(model, spectra, IDS, ARAConfig(keep=0.5, seed=s, **fast), progress=False) for s in (4, 5, 6)}
    assert len({tuple(p.ranks.items()) for p in each.values()}) > 1  # the orders really differ
    losses = {s: _reference_loss(model, spectra, IDS[:SCORE_WINDOWS], p) for s, p in each.items()}
    best = min(losses, key=losses.get)
    assert plan.params["seed"] == best and plan.ranks == each[best].ranks
    assert plan.params["seed_selection"]["candidates"] == [4, 5, 6]
    assert plan.params["seed_selection"]["calibration_loss"] == pytest.approx([losses[s] for s in (4, 5, 6)], rel=1e-4)


def test_ara_orders_needs_a_score_and_one_order_records_no_selection():
    from lowrank_infer.allocation import AllocationInputs

    model = tiny_model("llama").eval()
    config = ARAConfig(keep=0.5, orders=2, steps=2, samples=4, seq_len=12)
    _, spectra, _ = analyze(model, config, calib_ids=IDS, progress=False)
    with pytest.raises(ValueError, match="ARA orders=2 keeps the plan with the lowest calibration loss; nothing scores"):
        config.allocate(AllocationInputs(spectra, model=model, calib_ids=IDS, progress=False))
    plan = config.replace(orders=1).allocate(AllocationInputs(spectra, model=model, calib_ids=IDS, progress=False))
    assert "seed_selection" not in plan.params and plan.params["orders"] == 1
    with pytest.raises(ValueError, match="ARA needs orders >= 1, got 0"):
        ARAConfig(orders=0)


def test_scoring_plans_leaves_the_model_unchanged():
    model = tiny_model("llama").eval()
    with torch.no_grad():
        before = model(input_ids=IDS[:2]).logits
    kinds = {n: type(m) for n, m in model.named_modules()}
    analyze(model, DRankConfig(keep=0.5, candidates=CANDIDATES), calib_ids=IDS, progress=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS[:2]).logits, before)
    assert {n: type(m) for n, m in model.named_modules()} == kinds


def test_a_fixed_beta_is_honoured_without_scoring():
    model = tiny_model("llama")
    plan, _, _ = analyze(model, DRankConfig(keep=0.6, beta=0.2, whiten=False), progress=False)
    assert plan.params["beta"] == 0.2 and "beta_selection" not in plan.params


def test_non_finite_loss_is_an_error_and_the_layers_come_back():
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[5:].fill_(float("nan"))
    kinds = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="calibration loss is nan"):
        # Plain SVD: the NaN embeddings reach the scoring, not the whitening statistics.
        analyze(model, DRankConfig(keep=0.6, whiten=False, candidates=CANDIDATES), calib_ids=IDS, progress=False)
    assert {n: type(m) for n, m in model.named_modules()} == kinds


@pytest.mark.parametrize("config", [UniformConfig(), DRankConfig(whiten=False), ARAConfig(whiten=False)],
                         ids=["uniform-whitened", "drank-auto", "ara"])
def test_calibration_data_is_demanded_when_the_config_needs_it(config):
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(tiny_model("llama"), config, progress=False)


def test_plain_uniform_and_fixed_beta_need_no_calibration_data():
    for config in (UniformConfig(keep=0.5, whiten=False), DRankConfig(keep=0.5, whiten=False, beta=0.1)):
        model = tiny_model("llama")
        plan = compress(model, config, progress=False).plan
        assert plan.method == config.name and abs(plan.keep_achieved - 0.5) <= 0.005


def _uniform(model, keep=0.5):
    return uniform_plan(target_shapes(model), keep)


@pytest.mark.parametrize("config, words", [
    (DRankConfig(keep=0.5, whiten=False), "method drank disagrees with the plan's method 'uniform'"),
    (UniformConfig(keep=0.6, whiten=False), "keep 0.6 disagrees with the plan's keep 0.5"),
])
def test_a_config_that_contradicts_the_plan_is_an_error(config, words):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=words):
        compress(model, config, plan=_uniform(model), progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_a_hyperparameter_the_plan_was_not_made_with_is_an_error():
    model = tiny_model("llama")
    plan = drank_plan(analyze(model, DRankConfig(keep=0.5, beta=0.3, whiten=False), progress=False)[1], 0.5, beta=0.3)
    compress(tiny_model("llama"), DRankConfig(keep=0.5, beta=0.3, whiten=False), plan=plan, progress=False)
    with pytest.raises(ValueError, match="beta=0.1 has no effect with a plan"):
        compress(tiny_model("llama"), DRankConfig(keep=0.5, beta=0.1, whiten=False), plan=plan, progress=False)


def test_a_plan_alone_is_applied_with_its_method_and_keep():
    model = tiny_model("llama")
    plan = _uniform(model, 0.4)
    result = compress(model, UniformConfig(keep=0.4, whiten=False), plan=plan, progress=False)
    assert result.plan is plan
    lowrank = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank == {n: r for n, r in plan.ranks.items() if r is not None}
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(tiny_model("llama"), plan=plan, progress=False)  # the plan's config whitens by default


def test_config_for_names_the_method_and_its_parameters():
    assert config_for("drank", keep=0.6, beta=0.2) == DRankConfig(keep=0.6, beta=0.2)
    with pytest.raises(ValueError, match="unknown method 'svd'; choose one of uniform, drank, ara"):
        config_for("svd")
    with pytest.raises(ValueError, match=r"method 'ara' takes no parameter 'beta2' \(its parameters: steps, lr"):
        config_for("ara", beta2=1.0)


def test_allocators_choose_on_the_select_windows(monkeypatch):
    """D-Rank's beta="auto" scores plans, and ARA trains, on ``select_ids`` when given, while the
    whitening statistics still come from ``calib_ids``."""
    import sys

    pipeline = sys.modules["lowrank_infer.compress"]  # the package's `compress` attribute is the function
    model = tiny_model("llama")
    calib, select = IDS[:2], torch.randint(3, 128, (3, IDS.shape[1]), generator=torch.Generator().manual_seed(9))
    seen = []
    monkeypatch.setattr(pipeline, "mean_nll", lambda model, ids: seen.append(ids) or 1.0)
    analyze(model, DRankConfig(keep=0.5, candidates=CANDIDATES), calib_ids=calib, select_ids=select, progress=False)
    assert seen and all(torch.equal(ids, select[: len(ids)]) for ids in seen)
    plan_calib, spectra_calib, _ = analyze(model, DRankConfig(keep=0.5, beta=0.1), calib_ids=calib, progress=False)
    _, spectra_select, _ = analyze(model, DRankConfig(keep=0.5, beta=0.1), calib_ids=calib, select_ids=select,
                                   progress=False)
    name = next(iter(spectra_calib))
    assert torch.equal(spectra_calib[name].sigma, spectra_select[name].sigma)


def test_allocation_runs_the_model_on_the_gpu_only_when_model_and_factors_fit():
    """ARA trains on the whole model: on ``cuda`` when the model and the spectra it trains over take
    at most 70 % of the free memory, else where the model is (None), with a warning; other
    allocators and CPU jobs never move it."""
    from types import SimpleNamespace

    from lowrank_infer.compress import _forward_device
    from lowrank_infer.factorize import Spectrum

    model = tiny_model("llama")
    spectra = {name: Spectrum.empty(m, n, min(m, n) // 2, whitened=True)
               for name, (m, n) in target_shapes(model).items()}
    need = 4 * (sum(p.numel() for p in model.parameters()) + sum((m + n) * (min(m, n) // 2)
                                                                for m, n in target_shapes(model).values()))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert next(model.parameters()).device == cpu
    ara = SimpleNamespace(model=model, config=ARAConfig(keep=0.8), device=cuda)
    assert _forward_device(ara, spectra, lambda device: int(need / 0.7) + 1) == cuda
    with pytest.warns(UserWarning, match=r"ara runs the model on cpu, slowly: .* GiB free on cuda"):
        assert _forward_device(ara, spectra, lambda device: int(need / 0.7) - 64) is None
    plenty = lambda device: 1 << 50  # noqa: E731
    assert _forward_device(SimpleNamespace(model=model, config=UniformConfig(keep=0.8), device=cuda), spectra, plenty) is None
    assert _forward_device(SimpleNamespace(model=model, config=ARAConfig(keep=0.8), device=cpu), spectra, plenty) is None
