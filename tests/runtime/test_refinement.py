"""Block refinement: it never leaves a block worse on its held-out windows, it brings the compressed
stream closer to the dense one than the closed form alone, and bad runs leave nothing half-done."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from lowrank_infer.allocation import UniformConfig, uniform_plan
from lowrank_infer.calibration import block_stream, run_block
from lowrank_infer.compensation import compensated_factors, refit
from lowrank_infer.compress import analyze, compress
from lowrank_infer.refinement import BlockBatches, Factored, RefineConfig, refine_block
from lowrank_infer.structure import replace_module, target_shapes
from lowrank_infer.surgery import apply_plan

from tiny_models import tiny_model

GEN = torch.Generator().manual_seed(5)


def _first_block(model, ids, rank=4):
    """Block 0 of ``model`` with its linears factored (closed form) and its dense outputs, per batch of 2."""
    with torch.no_grad(), block_stream(model, ids, batch_size=2, device="cpu") as stream:
        block, calls, hidden = stream.blocks[0], stream.calls[0], stream.hidden
        targets = run_block(block, calls, hidden)
        block = copy.deepcopy(block)
    factored = {}
    for name, linear in list(block.named_modules()):
        if isinstance(linear, torch.nn.Linear):
            x_gram = torch.eye(linear.in_features, dtype=torch.float64)
            factored[name] = Factored(linear, *refit(linear.weight, x_gram, x_gram, rank, ridge=1e-6))
    for name, layer in factored.items():
        replace_module(block, name, layer)
    return block, factored, BlockBatches(calls, hidden, targets)


def _split(data: BlockBatches, fit: int):
    return (BlockBatches(data.calls[:fit], data.inputs[:fit], data.targets[:fit]),
            BlockBatches(data.calls[fit:], data.inputs[fit:], data.targets[fit:]))


def _held_error(block, held: BlockBatches) -> float:
    with torch.no_grad():
        outs = run_block(block, held.calls, held.inputs)
    err = sum((o.double() - t.double()).square().sum() for o, t in zip(outs, held.targets))
    return float(err / sum(t.double().square().sum() for t in held.targets))


def test_refinement_lowers_the_held_out_block_error_and_reports_it():
    model = tiny_model("llama").eval()
    block, factored, data = _first_block(model, torch.randint(3, 128, (40, 16), generator=GEN))
    fit, held = _split(data, 16)
    before = _held_error(block, held)
    frozen = {n: p.detach().clone() for n, p in block.named_parameters() if not n.endswith((".U", ".V"))}
    report = refine_block(block, factored, fit, held, RefineConfig(steps=48, lr=1e-2, eval_every=4, patience=3))
    after = _held_error(block, held)
    assert report.best_step > 0 and after < 0.98 * before, (before, after)
    assert report.held_before == pytest.approx(before, rel=1e-4) and report.held_after == pytest.approx(after, rel=1e-4)
    assert all(torch.equal(p, frozen[n]) for n, p in block.named_parameters() if n in frozen)  # only factors train


def test_a_refinement_that_only_hurts_keeps_the_closed_form_factors():
    model = tiny_model("llama").eval()
    block, factored, data = _first_block(model, torch.randint(3, 128, (8, 16), generator=GEN))
    fit, held = _split(data, 2)
    start = {name: (layer.U.detach().clone(), layer.V.detach().clone()) for name, layer in factored.items()}
    before = _held_error(block, held)
    report = refine_block(block, factored, fit, held, RefineConfig(steps=6, lr=5.0, eval_every=2, patience=1))
    assert report.best_step == 0 and report.held_after == report.held_before
    assert _held_error(block, held) == pytest.approx(before, rel=1e-6)
    for name, layer in factored.items():
        assert torch.equal(layer.U, start[name][0]) and torch.equal(layer.V, start[name][1])


def test_a_non_finite_loss_restores_the_factors_and_says_so():
    model = tiny_model("llama").eval()
    block, factored, data = _first_block(model, torch.randint(3, 128, (8, 16), generator=GEN))
    fit, held = _split(data, 2)
    poisoned = BlockBatches(fit.calls, fit.inputs, [t * float("nan") for t in fit.targets])
    start = {name: layer.U.detach().clone() for name, layer in factored.items()}
    with pytest.raises(ValueError, match="refine: training loss at step 1 is nan; the factors were restored"):
        refine_block(block, factored, poisoned, held, RefineConfig(steps=3))
    assert all(torch.equal(layer.U, start[name]) for name, layer in factored.items())


def test_refine_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="refine steps must be an integer >= 1"):
        RefineConfig(steps=0)
    with pytest.raises(ValueError, match="refine lr must be a positive number"):
        RefineConfig(steps=2, lr=float("nan"))
    with pytest.raises(ValueError, match="refine_steps must be an integer >= 0"):
        UniformConfig(keep=0.5, sequential=True, refine_steps=-1)
    with pytest.raises(ValueError, match="refine_lr must be a positive number"):
        UniformConfig(keep=0.5, refine_steps=2, refine_lr=0)


def _final_hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1].double()


def test_refined_model_is_closer_to_the_dense_one_on_unseen_windows():
    model = tiny_model("llama").eval()
    ids, held, unseen = (torch.randint(3, 128, (n, 16), generator=GEN) for n in (64, 8, 8))
    plan = uniform_plan(target_shapes(model), 0.4)
    closed = compensated_factors(model, plan, ids, batch_size=2, progress=False)
    refined = compensated_factors(model, plan, ids, progress=False, held_ids=held,
                                  refine=RefineConfig(steps=64, lr=1e-2, patience=4))
    assert len(refined.refined) == len(closed.refined) and all(r is not None for r in refined.refined)
    assert all(r.held_after < r.held_before for r in refined.refined)
    dense = _final_hidden(model, unseen)
    error = {kind: (_final_hidden(apply_plan(copy.deepcopy(model), plan, lambda n, r: found.factors[n]), unseen)
                    - dense).norm().item() for kind, found in (("closed", closed), ("refined", refined))}
    assert error["refined"] < error["closed"], error


def test_compress_records_refinement_in_the_plan_and_needs_held_out_windows():
    ids, held = torch.randint(3, 128, (4, 16), generator=GEN), torch.randint(3, 128, (2, 16), generator=GEN)
    config = UniformConfig(keep=0.5, sequential=True, refine_steps=3, refine_lr=1e-3)
    with pytest.raises(ValueError, match="refine_steps stops each block on held-out windows: pass select_ids"):
        compress(tiny_model("qwen2"), config, calib_ids=ids, progress=False)
    plan = compress(tiny_model("qwen2"), config, calib_ids=ids, select_ids=held, progress=False).plan
    record = plan.params["refine"]
    assert record["steps"] == 3 and record["relative_lr"] == 1e-3 and len(record["held_error_before"]) == 2
    assert all(a <= b for a, b in zip(record["held_error_after"], record["held_error_before"]))


def test_without_the_closed_form_refinement_starts_from_the_given_factors():
    model = tiny_model("llama").eval()
    ids = torch.randint(3, 128, (8, 16), generator=GEN)
    plan, spectra, _ = analyze(model, UniformConfig(keep=0.5), calib_ids=ids, progress=False)
    start = lambda name: spectra[name].factors(plan[name].rank)  # noqa: E731
    found = compensated_factors(model, plan, ids, initial=start, progress=False)
    assert found.refined == [None, None] and set(found.factors) == {n for n, r in plan.ranks.items() if r}
    for name, (U, V) in found.factors.items():
        assert torch.equal(U, start(name)[0].float()) and torch.equal(V, start(name)[1].float())
    held = torch.randint(3, 128, (2, 16), generator=GEN)
    result = compress(model, UniformConfig(keep=0.5, refine_steps=2), calib_ids=ids, select_ids=held, progress=False)
    assert "sequential" not in result.plan.params and result.plan.params["refine"]["steps"] == 2
    assert set(result.seconds) >= {"compensation"}


def _plan_keeping_dense(model, names):
    """A uniform keep-0.5 plan with the layers ``names`` kept dense."""
    plan = uniform_plan(target_shapes(model), 0.5)
    layers = [dataclasses.replace(layer, rank=None) if layer.name in names else layer for layer in plan.layers]
    return dataclasses.replace(plan, layers=layers)


KEPT = ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj")


def test_refinement_trains_the_layers_the_plan_keeps_dense_and_leaves_the_model_as_it_was():
    model = tiny_model("llama").eval()
    before = copy.deepcopy(model.state_dict())
    plan = _plan_keeping_dense(model, KEPT)
    ids, held = torch.randint(3, 128, (8, 16), generator=GEN), torch.randint(3, 128, (4, 16), generator=GEN)
    found = compensated_factors(model, plan, ids, refine=RefineConfig(steps=8, lr=3e-3, eval_every=2),
                                held_ids=held, progress=False)
    assert set(found.weights) == set(KEPT)
    improved = [r.best_step > 0 for r in found.refined]  # KEPT[i] is in block i
    assert any(improved)
    for name, trained in zip(KEPT, improved):  # a block that never beat its start keeps its weights
        assert found.weights[name].dtype == before[name + ".weight"].dtype
        assert torch.equal(found.weights[name], before[name + ".weight"]) is not trained
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    unrefined = compensated_factors(model, plan, ids, progress=False)
    assert unrefined.weights == {} and set(unrefined.factors) == set(found.factors)


def test_compress_puts_the_trained_dense_weights_in_the_model_and_counts_them():
    ids, held = torch.randint(3, 128, (8, 16), generator=GEN), torch.randint(3, 128, (4, 16), generator=GEN)
    config = UniformConfig(keep=0.5, sequential=True, refine_steps=8, refine_lr=3e-3)
    model = tiny_model("llama").eval()
    plan = _plan_keeping_dense(model, KEPT)
    reference = compensated_factors(copy.deepcopy(model), plan, ids, refine=RefineConfig(steps=8, lr=3e-3),
                                    held_ids=held, progress=False)
    result = compress(model, config, plan=plan, calib_ids=ids, select_ids=held, progress=False)
    assert result.plan.params["refine"]["dense_layers_trained"] == 2
    for name in KEPT:
        layer = model.get_submodule(name)
        assert type(layer) is torch.nn.Linear and torch.equal(layer.weight, reference.weights[name])


def test_closed_form_statistics_stay_float32_whatever_refinements_dtype():
    model = tiny_model("llama").eval()
    ids, held = torch.randint(3, 128, (8, 16), generator=GEN), torch.randint(3, 128, (2, 16), generator=GEN)
    plan = uniform_plan(target_shapes(model), 0.5)
    closed = compensated_factors(model, plan, ids, batch_size=2, progress=False)
    # A rate this small leaves every factor where the closed form put it, to float32 rounding.
    refined = compensated_factors(model, plan, ids, held_ids=held, progress=False,
                                  refine=RefineConfig(steps=2, lr=1e-12, compute_dtype="bfloat16"))
    for name, (U, V) in closed.factors.items():  # block 1's closed form reads block 0's stream
        torch.testing.assert_close(refined.factors[name][0] @ refined.factors[name][1].T, U @ V.T, rtol=1e-5, atol=1e-6)


def test_streams_that_only_steer_refinement_run_in_its_compute_dtype():
    from lowrank_infer.compensation import _stream_precision

    model = tiny_model("llama").eval()
    ids = torch.randint(3, 128, (4, 16), generator=GEN)
    given = lambda name: None  # noqa: E731  (only whether factors are given matters here)
    with torch.no_grad(), block_stream(model, ids, batch_size=2, device="cpu") as stream:
        block, calls, hidden = stream.blocks[0], stream.calls[0], stream.hidden
        outputs = {}
        for what, refine, initial in (("float32", RefineConfig(steps=2, compute_dtype="bfloat16"), None),
                                      ("no refinement", None, given),
                                      ("bfloat16", RefineConfig(steps=2, compute_dtype="bfloat16"), given)):
            with _stream_precision(block, refine, initial):
                outputs[what] = torch.cat(run_block(block, calls, hidden))
        reference = torch.cat(run_block(block, calls, hidden))
    assert torch.equal(outputs["float32"], reference) and torch.equal(outputs["no refinement"], reference)
    assert outputs["bfloat16"].dtype == torch.float32 and not torch.equal(outputs["bfloat16"], reference)
    assert (outputs["bfloat16"] - reference).norm() / reference.norm() < 1e-2
