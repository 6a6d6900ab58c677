"""Bad inputs, empty token counts and the dense break-even rule."""

import pytest
import torch

from lowrank_infer.kernels import lowrank_linear, triton_lowrank_linear, use_dense


def _good(dtype=torch.float32):
    return torch.randn(3, 24, dtype=dtype), torch.randn(37, 7, dtype=dtype), \
        torch.randn(24, 7, dtype=dtype), torch.randn(37, dtype=dtype)


BAD_INPUTS = {
    # case: (build (x, U, V, bias) from good ones, words the message must contain)
    "x_vs_V_rows": (lambda x, U, V, b: (x[:, :20], U, V, b),
                    ["x [3, 20]", "V [24, 7]", "V's rows"]),
    "rank_mismatch": (lambda x, U, V, b: (x, U[:, :5], V, b), ["U [37, 5]", "V [24, 7]", "rank"]),
    "bias_length": (lambda x, U, V, b: (x, U, V, b[:30]), ["bias [30]", "U [37, 7]"]),
    "bias_2d": (lambda x, U, V, b: (x, U, V, b[None]), ["bias [1, 37]"]),
    "U_1d": (lambda x, U, V, b: (x, U[:, 0], V, b), ["U [37]"]),
    "empty_rank": (lambda x, U, V, b: (x, U[:, :0], V[:, :0], b),
                   ["U [37, 0]", "V [24, 0]", "non-empty"]),
    "empty_n": (lambda x, U, V, b: (x[:, :0], U, V[:0], b), ["V [0, 7]", "non-empty"]),
    "mixed_dtype": (lambda x, U, V, b: (x, U.half(), V, b), ["U [37, 7]", "float16", "dtype"]),
    "integer": (lambda x, U, V, b: tuple(t.to(torch.int32) for t in (x, U, V, b)),
                ["x [3, 24]", "torch.int32"]),
    "float64": (lambda x, U, V, b: tuple(t.double() for t in (x, U, V, b)), ["float64"]),
    "mixed_device": (lambda x, U, V, b: (x, U, V, b.to("meta")), ["bias [37]", "device", "meta"]),
}


@pytest.mark.parametrize("fn", [lowrank_linear, triton_lowrank_linear], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_tensors(fn, case):
    build, words = BAD_INPUTS[case]
    with pytest.raises(ValueError) as info:
        fn(*build(*_good()))
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("out", [torch.empty(12, 37), torch.empty(3, 36), torch.empty(3, 37, dtype=torch.float16),
                                 torch.empty(37, 3).T], ids=["shape", "width", "dtype", "strided"])
def test_triton_rejects_an_output_buffer_that_does_not_fit(triton_device, out):
    x, U, V, b = _good()
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of shape \(3, 37\)"):
        triton_lowrank_linear(x, U, V, b, _out=out)


def test_interpreter_refuses_bfloat16_rather_than_return_garbage(triton_device):
    if triton_device != "cpu":
        pytest.skip("bfloat16 runs compiled on CUDA")
    with pytest.raises(TypeError, match="interpreter computes bfloat16 dots wrongly"):
        triton_lowrank_linear(*_good(torch.bfloat16))


def test_torch_path_handles_zero_tokens():
    x, U, V, b = _good()
    y = lowrank_linear(x[:0].reshape(2, 0, 24), U, V, b)
    assert y.shape == (2, 0, 37) and y.dtype == x.dtype


def test_triton_zero_tokens_returns_empty_without_launch(triton_device, monkeypatch):
    triton_lowrank = pytest.importorskip("lowrank_infer.kernels.triton_lowrank")
    monkeypatch.setattr(triton_lowrank, "_PATHS", {})  # any launch would KeyError
    x, U, V, b = (t.to(triton_device) for t in _good(torch.float16))
    y = triton_lowrank_linear(x[:0].reshape(0, 4, 24), U, V, b)
    assert y.shape == (0, 4, 37) and y.dtype == torch.float16 and y.device == x.device


@pytest.mark.parametrize(
    "m, n, k, dense",
    [(4, 4, 2, True), (4, 4, 1, False), (6, 3, 2, True), (6, 3, 1, False), (1, 1, 1, True),
     (4096, 4096, 2048, True), (4096, 4096, 2047, False), (4096, 11008, 2985, False),
     (4096, 11008, 2986, True)],
)
def test_use_dense_at_break_even(m, n, k, dense):
    assert use_dense(m, n, k) is dense
