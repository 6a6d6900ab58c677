"""A packed model whose layers run the Triton launchers (the interpreter on CPU) gives the logits
of the same model unpacked in torch: decode-sized and prefill-sized inputs, SiLU and GELU-tanh
MLPs, and Phi-3's fused gate_up_proj."""

import pytest
import torch

import lowrank_infer.module
import lowrank_infer.packing
from lowrank_infer import UniformConfig, compress, pack_model
from lowrank_infer.kernels import triton_gated_linear, triton_grouped_linear, triton_lowrank_linear

from tiny_models import tiny_model


CALLS = {}


def _counted(name, launcher):
    def run(*args, **kwargs):
        CALLS[name] = CALLS.get(name, 0) + 1
        return launcher(*args, **kwargs)

    return run


@pytest.fixture
def triton_layers(triton_device, monkeypatch):
    """Every low-rank layer, stack and gated MLP calls the Triton launcher itself (counted)."""
    CALLS.clear()
    monkeypatch.setattr(lowrank_infer.module, "lowrank_linear", _counted("single", triton_lowrank_linear))
    monkeypatch.setattr(lowrank_infer.packing, "lowrank_grouped_linear", _counted("grouped", triton_grouped_linear))
    monkeypatch.setattr(lowrank_infer.packing, "lowrank_gated_linear", _counted("gated", triton_gated_linear))
    return triton_device


@pytest.mark.parametrize("arch, expected", [("llama", (2, 2)), ("gemma", (2, 2)), ("phi3", (2, 0))])
@pytest.mark.parametrize("tokens", [16, 40])
def test_packed_triton_logits_match_unpacked_torch(triton_layers, arch, expected, tokens):
    model = tiny_model(arch).float()
    compress(model, UniformConfig(keep=0.5, whiten=False), progress=False)
    ids = torch.randint(3, 128, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The layers of the unpacked model run torch math: the fixture only patches the names the
        # forward passes look up, so compute the reference before packing, with them unpatched.
        reference = _torch_logits(model, ids)
        report = pack_model(model)
        assert (report.gated_mlps, report.qkv_groups) == expected
        CALLS.clear()
        got = model.to(triton_layers)(ids.to(triton_layers)).logits
    torch.testing.assert_close(got.cpu(), reference, rtol=1e-4, atol=1e-4)
    # Per block: the stacked q/k/v (else a fused qkv_proj), o and down alone, gate/up gated.
    gated, grouped = expected
    assert CALLS == {"gated": gated, "single": 2 * 2 + (2 if arch == "phi3" else 0)} | (
        {"grouped": grouped} if grouped else {})


def _torch_logits(model, ids):
    from lowrank_infer.kernels import lowrank_linear

    patched = lowrank_infer.module.lowrank_linear
    lowrank_infer.module.lowrank_linear = lowrank_linear
    try:
        return model(ids).logits
    finally:
        lowrank_infer.module.lowrank_linear = patched
