import pytest
import torch

from lowrank_infer.calibration import calibrate, symmetric_gram
from lowrank_infer.structure import target_linears

from tiny_models import ARCHS, tiny_model


def _direct_grams(model, ids):
    """XᵀX from hooks on one plain full-model forward pass (the independent reference)."""
    grams, handles = {}, []
    for name, linear in target_linears(model).items():
        def hook(_m, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        handles.append(linear.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return grams


@pytest.mark.parametrize("arch", [*ARCHS, "qwen2-swa"])
def test_blockwise_statistics_equal_full_forward(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    got = calibrate(model, ids, target_linears(model), batch_size=2, progress=False)
    want = _direct_grams(model, ids)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 4, 7, 64])
def test_symmetric_gram_equals_the_plain_product_and_is_exactly_symmetric(n):
    x = torch.randn(50, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    got = symmetric_gram(x)
    want = torch.einsum("ti,tj->ij", x, x)  # an independent reduction over the tokens
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, got.T)


def test_shared_inputs_share_one_statistic():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 16))
    grams = calibrate(model, ids, target_linears(model), progress=False)
    p = "model.layers.0."
    assert grams[p + "self_attn.q_proj"] is grams[p + "self_attn.k_proj"] is grams[p + "self_attn.v_proj"]
    assert grams[p + "mlp.gate_proj"] is grams[p + "mlp.up_proj"]
    assert grams[p + "self_attn.o_proj"] is not grams[p + "self_attn.q_proj"]


def test_model_is_left_unchanged():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 16))
    before = model(ids).logits
    calibrate(model, ids, target_linears(model), progress=False)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_bad_calibration_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="samples, seq_len"):
        calibrate(model, torch.zeros(0, dtype=torch.long), target_linears(model))


def test_streamed_blocks_keep_no_autograd_graph():
    """Outputs linked by a graph would keep every block's activations alive until the end."""
    from lowrank_infer.calibration import block_grams, block_stream

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 16))
    with block_stream(model, ids, batch_size=1, device="cpu") as stream:
        for _, grams, hidden in block_grams(stream, target_linears(model), device="cpu"):
            assert all(h.grad_fn is None and not h.requires_grad for h in hidden)
            assert all(not g.requires_grad for g in grams.values())


def test_folded_statistics_are_the_even_and_odd_windows_apart():
    """``folds=True``: fold 0 holds windows 0, 2, 4 …, fold 1 the others, across batches of odd size."""
    from lowrank_infer.calibration import block_grams, block_stream

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (7, 16), generator=torch.Generator().manual_seed(1))
    linears = target_linears(model)
    folded = {}
    with block_stream(model, ids, batch_size=3, device="cpu") as stream:
        for _, grams, _ in block_grams(stream, linears, device="cpu", folds=True):
            folded.update(grams)
    even, odd = _direct_grams(model, ids[0::2]), _direct_grams(model, ids[1::2])
    for name in linears:
        assert folded[name].shape[0] == 2
        torch.testing.assert_close(folded[name][0], even[name], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(folded[name][1], odd[name], rtol=1e-6, atol=1e-6)
