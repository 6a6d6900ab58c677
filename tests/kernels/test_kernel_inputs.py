"""Bad inputs (factors checked once, activations per call), empty token counts, break-even."""

import pytest
import torch

from lowrank_infer.kernels import check_factors, lowrank_linear, triton_lowrank_linear, use_dense


def _good(dtype=torch.float32):
    return torch.randn(3, 24, dtype=dtype), torch.randn(37, 7, dtype=dtype), \
        torch.randn(24, 7, dtype=dtype), torch.randn(37, dtype=dtype)


BAD_FACTORS = {
    # case: (build (U, V, bias) from good ones, words the message must contain)
    "rank_mismatch": (lambda U, V, b: (U[:, :5], V, b), ["U [37, 5]", "V [24, 7]", "share k"]),
    "bias_length": (lambda U, V, b: (U, V, b[:30]), ["bias [30]", "U [37, 7]", "bias length"]),
    "bias_2d": (lambda U, V, b: (U, V, b[None]), ["bias [1, 37]", "bias [m]"]),
    "U_1d": (lambda U, V, b: (U[:, 0], V, b), ["U [37]", "U [m, k]"]),
    "empty_rank": (lambda U, V, b: (U[:, :0], V[:, :0], b), ["U [37, 0]", "V [24, 0]", "non-empty"]),
    "empty_n": (lambda U, V, b: (U, V[:0], b), ["V [0, 7]", "non-empty"]),
    "mixed_dtype": (lambda U, V, b: (U.half(), V, b), ["U torch.float16", "V torch.float32", "one dtype"]),
    "integer": (lambda U, V, b: tuple(t.to(torch.int32) for t in (U, V, b)), ["U [37, 7]", "torch.int32"]),
    "float64": (lambda U, V, b: tuple(t.double() for t in (U, V, b)), ["torch.float64", "float16/bfloat16/float32"]),
    "mixed_device": (lambda U, V, b: (U, V, b.to("meta")), ["bias [37]", "bias meta", "one device"]),
}

BAD_INPUTS = {
    # case: (build x from a good [3, 24] float32 one, words the message must contain)
    "last_dim": (lambda x: x[:, :20], ["x [3, 20]", "V [24, 7]", "V's rows"]),
    "scalar": (lambda x: x[0, 0], ["x []", "V's rows"]),
    "dtype": (lambda x: x.half(), ["x is torch.float16", "factors are torch.float32"]),
    "integer": (lambda x: x.to(torch.int32), ["torch.int32", "expected float16, bfloat16 or float32"]),
    "device": (lambda x: x.to("meta"), ["x is on meta", "factors are on cpu"]),
}


@pytest.mark.parametrize("check", [check_factors, lambda U, V, b: triton_lowrank_linear(torch.randn(3, 24), U, V, b)],
                         ids=["check_factors", "triton_lowrank_linear"])
@pytest.mark.parametrize("case", sorted(BAD_FACTORS))
def test_bad_factors_raise_value_error_naming_tensors(check, case):
    build, words = BAD_FACTORS[case]
    with pytest.raises(ValueError) as info:
        check(*build(*_good()[1:]))
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("fn", [lowrank_linear, triton_lowrank_linear], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_it(fn, case):
    build, words = BAD_INPUTS[case]
    x, U, V, b = _good()
    with pytest.raises(ValueError) as info:
        fn(build(x), U, V, b)
    for word in words:
        assert word in str(info.value)


def test_good_factors_pass():
    check_factors(*_good()[1:])
    check_factors(*_good(torch.bfloat16)[1:3])


@pytest.mark.parametrize("out", [torch.empty(12, 37), torch.empty(3, 36), torch.empty(3, 37, dtype=torch.float16),
                                 torch.empty(37, 3).T], ids=["shape", "width", "dtype", "strided"])
def test_launcher_rejects_an_output_buffer_that_does_not_fit(launch, triton_device, out):
    x, U, V, b = (t.to(triton_device) for t in _good())
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of shape \(3, 37\)"):
        launch(x, U, V, b, out=out.to(triton_device))


def test_interpreter_refuses_bfloat16_rather_than_return_garbage(triton_device):
    if triton_device != "cpu":
        pytest.skip("bfloat16 runs compiled on CUDA")
    with pytest.raises(TypeError, match="interpreter computes bfloat16 dots wrongly"):
        triton_lowrank_linear(*_good(torch.bfloat16))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_torch_path_handles_zero_tokens(grad):
    x, U, V, b = _good()
    with torch.set_grad_enabled(grad):
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
