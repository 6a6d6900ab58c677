"""Model building and the low-rank path switch of ``bench e2e``."""

import pytest
import torch

from lowrank_infer import LowRankLinear
from lowrank_infer.bench import e2e
from lowrank_infer.bench.shapes import hf_config
from lowrank_infer.io import model_plan


@pytest.fixture
def tiny(tiny_config_file):
    torch.manual_seed(0)
    return e2e.random_model(hf_config(str(tiny_config_file)), torch.device("cpu"), torch.float32)


def test_lowrank_path_switches_every_layer_and_restores(monkeypatch):
    from lowrank_infer import module

    calls = []

    def spy(x, U, V, bias=None):
        calls.append(x.shape)
        return e2e.two_matmul_linear(x, U, V, bias)

    monkeypatch.setitem(e2e.LOWRANK_PATHS, "spy", spy)
    layer = LowRankLinear.from_factors(torch.randn(8, 2), torch.randn(6, 2), torch.randn(8))
    original = module.lowrank_linear
    with e2e.lowrank_path("spy"):
        y = layer(torch.randn(3, 6))
    assert calls == [(3, 6)] and y.shape == (3, 8)
    assert module.lowrank_linear is original
    layer(torch.randn(3, 6))
    assert len(calls) == 1


def test_random_compress_follows_the_uniform_plan(tiny):
    ids = torch.randint(128, (1, 12))
    with torch.no_grad():
        dense_logits = tiny(ids).logits
        model = e2e.random_compress(tiny, e2e.uniform_random_plan(tiny, 0.5, name="tiny"))
        logits = model(ids).logits
    plan = model_plan(model)
    assert plan.keep_target == 0.5 and plan.model == "tiny"
    for layer in plan.layers:
        assert model.get_submodule(layer.name).rank == layer.rank
    assert torch.isfinite(logits).all()
    assert 0.2 < logits.std() / dense_logits.std() < 5  # factors scaled like the dense weights


def test_densify_computes_the_same_function(tiny):
    model = e2e.random_compress(tiny, e2e.uniform_random_plan(tiny, 0.5))
    ids = torch.randint(128, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        e2e.densify(model)
        after = model(ids).logits
    assert not any(isinstance(m, LowRankLinear) and not m.is_dense for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_decode_steps_exactly_fill_the_static_cache(monkeypatch):
    """With the GPU path's warm-up steps, the timed steps fill the cache: one more would fault."""
    steps = []

    def graph_like(step, device):
        for _ in range(e2e._DECODE_WARMUP):  # what capture_graph runs before capturing
            step()
        steps.append(step)
        return step, "fake_graph"

    monkeypatch.setattr(e2e, "_prepare_step", graph_like)
    settings = e2e.E2ESettings([4], [2], context=5, decode_steps=3, trials=2, paths=["torch_lowrank"],
                               device=torch.device("cpu"), dtype=torch.float32, rep_ms=1)
    config = hf_config("smollm2-135m")
    config.num_hidden_layers, config.vocab_size = 1, 64
    model = e2e.random_model(config, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        ms, timer = e2e._decode_ms(model, 2, settings)
        assert ms > 0 and timer == "fake_graph"
        with pytest.raises(IndexError):
            steps[0]()
