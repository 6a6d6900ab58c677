"""Model building and the backend switch of ``bench e2e``."""

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


def test_each_backend_runs_while_its_rows_are_measured(tiny):
    plan = uniform_plan(target_shapes(tiny), 0.5)
    model = apply_plan(tiny, plan, e2e.random_factors(tiny))
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, LowRankLinear))
    layer.register_forward_pre_hook(lambda *_: seen.append(get_backend()))
    before = get_backend()
    rows = e2e.run_e2e_bench([e2e.Variant(lambda: model, plan)], _settings(["dense", "triton", "torch"]))
    assert [r["backend"] for r in rows] == ["triton", "triton", "torch", "torch"]  # prefill, decode each
    first_torch = seen.index("torch")
    assert set(seen[:first_torch]) == {"triton"} and set(seen[first_torch:]) == {"torch"}
    assert get_backend() == before


def test_decode_steps_exactly_fill_the_static_cache(monkeypatch):
    """With the GPU path's warm-up steps, the timed steps fill the cache: one more would fault."""
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
        ms, timer = e2e._decode_ms(model, 2, settings)
        assert ms > 0 and timer == "fake_graph"
        with pytest.raises(IndexError):
            steps[0]()
