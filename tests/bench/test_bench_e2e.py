"""Model building, the backend switch, compiled decode and packing of ``bench e2e``."""

import dataclasses

import pytest
import torch

from lowrank_infer import LowRankLinear
from lowrank_infer.allocation import plan_from_ranks, uniform_plan
from lowrank_infer.bench import e2e
from lowrank_infer.bench.shapes import hf_config
from lowrank_infer.kernels import get_backend
from lowrank_infer.structure import target_shapes
from lowrank_infer.surgery import apply_plan

CPU = torch.device("cpu")


@pytest.fixture
def tiny(tiny_config_file):
    torch.manual_seed(0)
    return e2e.random_model(hf_config(str(tiny_config_file)), CPU, torch.float32)


def _settings(backends, **timing):
    timing = {"prompt_lens": [4], "batches": [1], "context": 4, "decode_steps": 1, "trials": 1} | timing
    return e2e.E2ESettings(**timing, backends=backends, device=CPU, dtype=torch.float32, rep_ms=1)


def test_random_factors_have_the_weight_scale_and_the_plan_shapes():
    linear = torch.nn.Linear(512, 384)
    torch.nn.init.normal_(linear.weight, std=0.05)
    model = torch.nn.Sequential(linear)
    U, V = e2e.random_factors(model)("0", 96)
    assert U.shape == (384, 96) and V.shape == (512, 96) and U.dtype == linear.weight.dtype
    assert 0.8 < (U @ V.T).std().item() / 0.05 < 1.25


def test_random_factors_keep_a_model_s_logits_tame(tiny):
    ids = torch.randint(128, (1, 12))
    with torch.no_grad():
        dense_logits = tiny(ids).logits
        plan = uniform_plan(target_shapes(tiny), 0.5)
        logits = apply_plan(tiny, plan, e2e.random_factors(tiny))(ids).logits
    assert torch.isfinite(logits).all()
    assert 0.2 < logits.std() / dense_logits.std() < 5


def test_shape_only_variants_build_each_plan_at_its_ranks(tiny_config_file):
    config = hf_config(str(tiny_config_file))
    shapes = target_shapes(e2e.random_model(config, torch.device("meta"), torch.float32))
    plan = plan_from_ranks(shapes, {name: None if "mlp" in name else 5 for name in shapes}, keep=0.7, method="ara")
    variants = e2e.shape_only_variants(config, "tiny", [0.6, 1.0], CPU, torch.float32, plans=[plan])
    assert [(v.plan.method, v.plan.keep_target) if v.plan else None for v in variants] == [
        None, ("uniform", 0.6), ("ara", 0.7)]
    assert not any(isinstance(m, LowRankLinear) for m in variants[0].build().modules())
    for variant in variants[1:]:
        model = variant.build()
        for layer in variant.plan.layers:
            module = model.get_submodule(layer.name)
            assert (module.rank if layer.rank else type(module)) == (layer.rank or torch.nn.Linear)


def test_each_backend_runs_while_its_rows_are_measured(tiny, monkeypatch):
    plan = uniform_plan(target_shapes(tiny), 0.5)
    model = apply_plan(tiny, plan, e2e.random_factors(tiny))
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, LowRankLinear))
    layer.register_forward_pre_hook(lambda *_: seen.append(get_backend()))
    measurement, ran = e2e._measurement, []

    def spy(measure, device, **row):
        seen.clear()
        result = measurement(measure, device, **row)
        ran.append((row["backend"], set(seen)))
        return result

    monkeypatch.setattr(e2e, "_measurement", spy)
    before = get_backend()
    rows = e2e.run_e2e_bench([e2e.Variant(lambda: model, plan)], _settings(["dense", "triton", "torch"]))
    # Backends inside each case: prefill with each, then decode with each.
    assert [(r["phase"], r["backend"]) for r in rows] == [
        ("prefill", "triton"), ("prefill", "torch"), ("decode", "triton"), ("decode", "torch")]
    assert ran == [(r["backend"], {r["backend"]}) for r in rows]
    assert get_backend() == before


@pytest.mark.parametrize("compiled", [False, True])
def test_decode_steps_exactly_fill_the_static_cache(monkeypatch, compiled):
    """With the GPU path's warm-up steps (and a compiled step's check), the timed steps fill the
    cache: one more would fault."""
    steps = []

    def graph_like(step, device):
        for _ in range(e2e._DECODE_WARMUP):  # what capture_graph runs before capturing
            step()
        steps.append(step)
        return step, "fake_graph"

    monkeypatch.setattr(e2e, "_prepare_step", graph_like)
    settings = _settings(["torch"], context=5, decode_steps=3, trials=2, batches=[2])
    config = hf_config("smollm2-135m")
    config.num_hidden_layers, config.vocab_size = 1, 64
    model = e2e.random_model(config, CPU, torch.float32)
    with torch.inference_mode():
        # The model itself stands in for its compiled self: the same check and steps, no compile time.
        result = e2e._decode_ms(model, 2, settings, model if compiled else None)
        assert result["median_ms"] > 0 and result["timer"] == "fake_graph"
        assert result.get("compiled_rel_err") == (0.0 if compiled else None)
        with pytest.raises(IndexError):
            steps[0]()


def test_compiled_decode_generates_what_eager_transformers_generates(tiny):
    """The step the bench times in compiled mode, run greedily, against transformers' own eager
    generate (dynamic cache, no compile) on a compressed model."""
    from transformers import StaticCache

    model = apply_plan(tiny, uniform_plan(target_shapes(tiny), 0.5), e2e.random_factors(tiny))
    prompt, new = torch.randint(128, (2, 6)), 5
    with torch.inference_mode():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new)
        ids = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        step = e2e.decode_step(e2e.compile_decode(model), ids, cache)
        tokens, logits = [ids.clone()], []
        for _ in range(new - 1):
            logits.append(step()[:, -1].clone())
            ids.copy_(logits[-1].argmax(-1, keepdim=True))
            tokens.append(ids.clone())
    assert torch.equal(torch.cat(tokens, dim=1), ref.sequences[:, prompt.shape[1]:])
    torch.testing.assert_close(torch.stack(logits), torch.stack(ref.logits[1:]), rtol=1e-4, atol=1e-5)


def test_the_cli_offers_the_bench_s_modes_and_packings():
    from lowrank_infer.bench import cli

    assert cli._E2E_MODES == e2e.MODES and cli._E2E_PACKINGS == e2e.PACKINGS


def test_packing_order():
    assert e2e.check_packing(["packed", "unpacked"]) == ("unpacked", "packed")
    with pytest.raises(ValueError, match="unknown packing 'fused'"):
        e2e.check_packing(["fused"])
    assert e2e.check_packing(["unpacked"]) == ("unpacked",)


def test_compressed_models_are_measured_unpacked_then_packed(tiny, monkeypatch):
    packed = []
    real = e2e.pack_model
    monkeypatch.setattr(e2e, "pack_model", lambda model: packed.append(model) or real(model))
    plan = uniform_plan(target_shapes(tiny), 0.5)
    variants = [e2e.Variant(lambda: tiny), e2e.Variant(lambda: apply_plan(tiny, plan, e2e.random_factors(tiny)), plan)]
    seen = []
    settings = dataclasses.replace(_settings(["dense", "torch"]), packings=("unpacked", "packed"))
    rows = e2e.run_e2e_bench(variants, settings, on_row=lambda rows: seen.append(len(rows)))
    assert [(r["method"], r["packed"], r["phase"]) for r in rows] == [
        ("dense", False, "prefill"), ("dense", False, "decode"), ("uniform", False, "prefill"),
        ("uniform", False, "decode"), ("uniform", True, "prefill"), ("uniform", True, "decode")]
    assert packed == [tiny] and seen == [1, 2, 3, 4, 5, 6]
    assert all(r["speedup_vs_dense"] is not None for r in rows)


def test_packed_compiled_step_matches_the_unpacked_eager_step(tiny):
    from transformers import StaticCache

    model = apply_plan(tiny, uniform_plan(target_shapes(tiny), 0.5), e2e.random_factors(tiny))
    prompt, ids = torch.randint(128, (2, 6)), torch.randint(128, (2, 1))

    def step_logits(forward):
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + 1)
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        return e2e.decode_step(forward, ids, cache)()

    ops = []

    def recording(graph, inputs):  # a torch.compile backend that runs the graph as traced
        ops.extend(str(node.target) for node in graph.graph.nodes if "lowrank_infer" in str(node.target))
        return graph.forward

    with torch.inference_mode():
        eager = step_logits(model)
        report = e2e._pack(model)
        compiled = step_logits(e2e.compile_decode(model))
        step_logits(torch.compile(model, fullgraph=True, dynamic=False, backend=recording))
    assert report["gated_mlps"] == report["qkv_groups"] == 2  # the tiny config's two blocks
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    # The compiled step runs each block's q/k/v as one grouped op and gate/up as one gated op.
    assert sorted(set(ops)) == [f"lowrank_infer.{op}.default" for op in (
        "lowrank_gated_linear", "lowrank_grouped_linear", "lowrank_linear")]
    assert ops.count("lowrank_infer.lowrank_grouped_linear.default") == 2
    assert ops.count("lowrank_infer.lowrank_gated_linear.default") == 2


@pytest.mark.parametrize("layer_crop", [True, False], ids=["crop", "no-crop"])
def test_rewinding_one_slot_makes_the_next_step_rewrite_the_last_one(tiny, monkeypatch, layer_crop):
    """The rewound cache gives the logits of the step before the rewind, with or without the
    ``StaticLayer.crop`` that older transformers (the GPU image's 5.17) lack."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    if not layer_crop:
        monkeypatch.delattr(StaticLayer, "crop", raising=False)
    ids = torch.randint(0, tiny.config.vocab_size, (1, 6))
    cache = StaticCache(config=tiny.config, max_cache_len=8)
    with torch.no_grad():
        tiny(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
        step = e2e.decode_step(tiny, ids[:, 5:], cache)
        first = step()
        e2e.rewind_one_slot(cache)
        assert int(cache.get_seq_length()) == 5
        again = step()
        assert int(cache.get_seq_length()) == 6
        # A step without the rewind would sit one position later and differ.
        later = step()
    torch.testing.assert_close(again, first)
    assert not torch.allclose(later, first)
