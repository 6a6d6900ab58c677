"""The compute dtype: where ``auto`` picks bfloat16, what it refuses, and that the passes it
covers really run under autocast while the tensors they train stay float32."""

import pytest
import torch
from torch import nn

from lowrank_infer import precision
from lowrank_infer.allocation import MethodConfig
from lowrank_infer.healing import HealConfig
from lowrank_infer.training import Schedule, train_early_stopped


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16", "avx512f"}, "bfloat16"), ({"amx_bf16"}, "bfloat16"),
                                             ({"avx2", "avx512f"}, "float32"), (set(), "float32")])
def test_auto_is_bfloat16_only_on_a_cpu_with_native_bfloat16(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(flags))
    assert precision.resolve_compute_dtype("auto", "cpu") == expected
    assert precision.resolve_compute_dtype("float32", "cpu") == "float32"
    assert precision.resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"


def test_an_unknown_compute_dtype_is_refused_everywhere():
    with pytest.raises(ValueError, match="compute dtype must be one of float32, bfloat16, got 'float16'"):
        precision.resolve_compute_dtype("float16", "cpu")
    for make in (lambda: Schedule(steps=1, compute_dtype="bf16"), lambda: HealConfig(steps=1, compute_dtype="half"),
                 lambda: MethodConfig(compute_dtype="fp32")):
        with pytest.raises(ValueError, match="compute dtype must be one of"):
            make()


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_training_and_held_out_passes_run_in_the_compute_dtype(compute_dtype):
    """Every training and held-out call runs under autocast to bfloat16 (or none for float32);
    the parameter stays float32 and still fits a least-squares target."""
    gen = torch.Generator().manual_seed(0)
    x, target = torch.randn(64, 8, generator=gen), torch.randn(64, 4, generator=gen)
    weight = nn.Parameter(torch.randn(8, 4, generator=gen))
    seen = []

    def note() -> None:
        enabled = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if enabled else None)

    def loss(_step):
        note()
        return ((x @ weight).float() - target).square().mean()

    def held():
        note()
        with torch.no_grad():
            return float(((x @ weight).float() - target).square().mean())

    start = held()
    seen.clear()
    report = train_early_stopped([weight], loss, held, Schedule(steps=20, lr=0.05, eval_every=5, compute_dtype=compute_dtype))
    expected = torch.bfloat16 if compute_dtype == "bfloat16" else None
    assert seen and all(dtype == expected for dtype in seen)
    assert weight.dtype == torch.float32 and report.held_after < 0.9 * start


def test_frozen_weights_cast_changes_no_result_and_gives_every_weight_back():
    """Under bfloat16 autocast a model computes bit for bit the same logits and gradients with its
    frozen linear weights cast once; inside, the trained weight, the embedding table (and the output
    layer tied to it) and the norms stay float32; afterwards every parameter is its own again."""
    from tiny_models import tiny_model

    model = tiny_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trained = model.model.layers[0].self_attn.q_proj.weight
    for p in model.parameters():
        p.requires_grad_(p is trained)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids).logits
        (grad,) = torch.autograd.grad(logits.float().square().mean(), trained)
        return logits, grad

    expected = run()
    with precision.frozen_weights_cast(model, "bfloat16"):
        dtypes = {name: p.dtype for name, p in model.named_parameters()}
        got = run()
    for tensor, want in zip(got, expected, strict=True):
        assert torch.equal(tensor, want)
    frozen_linears = [n for n in dtypes if n.endswith(("proj.weight",)) and n != "model.layers.0.self_attn.q_proj.weight"]
    assert frozen_linears and all(dtypes[n] == torch.bfloat16 for n in frozen_linears)
    assert {n: d for n, d in dtypes.items() if n not in frozen_linears} == {n: torch.float32 for n in dtypes
                                                                            if n not in frozen_linears}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    with precision.frozen_weights_cast(model, "float32"):
        assert all(p.dtype == torch.float32 for p in model.parameters())
