"""The registered op: dispatch, torch.compile, opcheck, autograd, import hygiene."""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_infer.kernels import (
    BACKENDS, get_backend, lowrank_linear, set_backend, torch_lowrank_linear, triton_lowrank_linear,
    two_matmul_linear, use_backend,
)
from lowrank_infer.kernels import lowrank_linear_op


class _TwoLayer(torch.nn.Module):
    def __init__(self, n=24, k=7, hidden=37):
        super().__init__()
        self.U1 = torch.nn.Parameter(torch.randn(hidden, k) / k**0.5)
        self.V1 = torch.nn.Parameter(torch.randn(n, k) / n**0.5)
        self.b1 = torch.nn.Parameter(torch.randn(hidden))
        self.U2 = torch.nn.Parameter(torch.randn(n, k) / k**0.5)
        self.V2 = torch.nn.Parameter(torch.randn(hidden, k) / hidden**0.5)

    def forward(self, x, linear=lowrank_linear):
        h = torch.nn.functional.gelu(linear(x, self.U1, self.V1, self.b1))
        return linear(h, self.U2, self.V2)


def _float64_linear(x, U, V, bias=None):
    """The independent oracle: plain float64 math, differentiated by autograd."""
    y = x.double() @ V.double() @ U.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dispatch_matches_reference(device, dtype, grad, make_inputs, assert_matches_reference):
    x, U, V, b = make_inputs(5, 37, 24, 7, dtype, device, lead=(2,))
    with torch.set_grad_enabled(grad):
        assert_matches_reference(lowrank_linear(x, U, V, b), x, U, V, b)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_cpu_uses_the_fp32_intermediate_path(grad):
    """In fp16 the fp32-intermediate path and two fp16 matmuls round differently: the CPU
    dispatch must be the former, bit for bit, through the op (grad) or around it (no_grad)."""
    gen = torch.Generator().manual_seed(0)
    x, U, V = (torch.randn(*shape, generator=gen).half() for shape in ((3, 240), (37, 70), (240, 70)))
    assert not torch.equal(two_matmul_linear(x, U, V), torch_lowrank_linear(x, U, V))
    with torch.set_grad_enabled(grad):
        assert torch.equal(lowrank_linear(x, U, V), torch_lowrank_linear(x, U, V))


def test_autograd_goes_through_the_registered_op(device):
    x = torch.randn(2, 24, device=device, requires_grad=True)
    y = lowrank_linear(x, torch.randn(37, 7, device=device), torch.randn(24, 7, device=device))
    assert "lowrank_infer_lowrank_linear" in type(y.grad_fn).__name__


def test_torch_compile_traces_the_registered_op_even_without_grad():
    """Eager CPU calls without grad skip the dispatcher; a compiled graph must still hold the op."""
    traced = []

    def backend(graph_module, example_inputs):
        traced.extend(node.target for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module

    U, V = torch.randn(37, 7), torch.randn(24, 7)
    with torch.no_grad():
        torch.compile(lambda x: lowrank_linear(x, U, V), backend=backend, fullgraph=True)(torch.randn(3, 24))
    assert torch.ops.lowrank_infer.lowrank_linear.default in traced


def test_torch_compile_fullgraph_matches_float64(device):
    torch.manual_seed(0)
    model = _TwoLayer().to(device)
    x = torch.randn(2, 5, 24, device=device)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x).double(), model(x, _float64_linear), rtol=1e-5, atol=1e-5)


def test_torch_compile_backward_matches_float64(device):
    torch.manual_seed(0)
    model = _TwoLayer().to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 5, 24, device=device)
    grads = []
    for run in (compiled, lambda x: model(x, _float64_linear)):
        model.zero_grad()
        run(x).square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-4)


def test_opcheck(device):
    x = torch.randn(2, 3, 24, device=device, requires_grad=True)
    U = torch.randn(37, 7, device=device, requires_grad=True)
    V = torch.randn(24, 7, device=device, requires_grad=True)
    b = torch.randn(37, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.lowrank_infer.lowrank_linear.default, (x, U, V, b))
    torch.library.opcheck(torch.ops.lowrank_infer.lowrank_linear.default, (x, U, V, None))


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients_match_float64_autograd(device, with_bias):
    torch.manual_seed(0)
    leaves = [torch.randn(2, 3, 24), torch.randn(37, 7), torch.randn(24, 7), torch.randn(37)]
    ours = [t.to(device).requires_grad_() for t in leaves]
    theirs = [t.detach().to(device, torch.float64).requires_grad_() for t in leaves]
    if not with_bias:
        ours[3] = theirs[3] = None
    grad_y = torch.randn(2, 3, 37, device=device)
    lowrank_linear(*ours).backward(grad_y)
    _float64_linear(*theirs).backward(grad_y.double())
    for mine, ref in zip(ours, theirs):
        if mine is not None:
            assert mine.grad.dtype == mine.dtype
            torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


def test_import_does_not_initialise_cuda_or_load_triton_and_reads_the_backend_variable():
    code = ("import sys, torch, lowrank_infer.kernels; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; "
            "assert 'lowrank_infer.kernels.triton_lowrank' not in sys.modules, 'launcher imported'; "
            "assert lowrank_infer.kernels.get_backend() == 'torch', lowrank_infer.kernels.get_backend()")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "LOWRANK_INFER_BACKEND": "torch"})


def test_bad_backend_variable_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv("LOWRANK_INFER_BACKEND", "cutlass")
    with pytest.raises(ValueError, match="LOWRANK_INFER_BACKEND='cutlass' is not a backend; "
                                         "choose one of cublas, triton, triton_fp32, torch"):
        lowrank_linear_op._backend_from_env()
    monkeypatch.delenv("LOWRANK_INFER_BACKEND")
    assert lowrank_linear_op._backend_from_env() == "cublas"


def test_missing_triton_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    x, U, V = torch.randn(3, 24), torch.randn(37, 7), torch.randn(24, 7)
    with pytest.raises(ImportError, match="pip install 'lowrank-infer\\[triton\\]'"):
        triton_lowrank_linear(x, U, V)
    assert lowrank_linear(x, U, V).shape == (3, 37)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("T", [1, 17, 130])
def test_cuda_graph_capture(name, T, make_inputs, assert_matches_reference):
    # T picks each Triton path: decode, prefill, shrink/expand (k = 300)
    x, U, V, b = make_inputs(T, 37, 24, 300 if T == 130 else 33, torch.float16, "cuda")
    with use_backend(name):
        lowrank_linear(x, U, V, b)  # compile and cache configs outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lowrank_linear(x, U, V, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(y, x, U, V, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA backends need a GPU")
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_each_cuda_backend_matches_reference(name, dtype, make_inputs, assert_matches_reference):
    x, U, V, b = make_inputs(5, 37, 24, 7, dtype, "cuda", lead=(2,))
    with use_backend(name):
        assert_matches_reference(lowrank_linear(x, U, V, b), x, U, V, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA backends need a GPU")
def test_backend_picks_the_cuda_implementation():
    """fp16 rounding tells the backends apart: cublas rounds the intermediate, torch does not."""
    gen = torch.Generator().manual_seed(0)
    x, U, V = (torch.randn(*shape, generator=gen).half().cuda() for shape in ((3, 240), (37, 70), (240, 70)))
    expected = {"cublas": two_matmul_linear(x, U, V), "torch": torch_lowrank_linear(x, U, V)}
    assert not torch.equal(expected["cublas"], expected["torch"])
    for name, want in expected.items():
        with use_backend(name):
            assert torch.equal(lowrank_linear(x, U, V), want), name


def test_use_backend_restores_the_previous_one_even_after_an_error():
    before = get_backend()
    other = next(name for name in BACKENDS if name != before)
    with pytest.raises(RuntimeError, match="inside"):
        with use_backend(other):
            assert get_backend() == other
            raise RuntimeError("inside")
    assert get_backend() == before


def test_unknown_backend_is_refused():
    before = get_backend()
    message = "unknown backend 'cutlass'; choose one of cublas, triton, triton_fp32, torch"
    with pytest.raises(ValueError, match=message):
        set_backend("cutlass")
    with pytest.raises(ValueError, match=message):
        with use_backend("cutlass"):
            pass
    assert get_backend() == before


@pytest.mark.parametrize("tokens, lead, expected", [(1, (), "triton"), (32, (), "triton"), (33, (), "cublas"),
                                                     (17, (2,), "cublas"), (16, (2,), "triton")])
def test_the_triton_backend_hands_prefill_to_cublas(monkeypatch, tokens, lead, expected):
    """Hybrid: the Triton kernels up to DECODE_MAX_TOKENS rows (leading dims count), cuBLAS above."""
    from lowrank_infer.kernels import lowrank_linear_op as op

    assert op._CUDA_IMPLEMENTATIONS["triton_fp32"] is op._triton  # the kernels at every size
    ran = []
    monkeypatch.setattr(op, "_triton", lambda *a: ran.append("triton") or torch_lowrank_linear(*a))
    monkeypatch.setattr(op, "two_matmul_linear", lambda *a: ran.append("cublas") or two_matmul_linear(*a))
    gen = torch.Generator().manual_seed(tokens)
    x, U, V = torch.randn(*lead, tokens, 24, generator=gen), torch.randn(40, 8, generator=gen), torch.randn(24, 8, generator=gen)
    y = op._CUDA_IMPLEMENTATIONS["triton"](x, U, V, None)
    assert ran == [expected]
    torch.testing.assert_close(y.double(), x.double() @ V.double() @ U.double().T, rtol=1e-4, atol=1e-4)


class _MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matrix product that runs while it is active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


def test_under_bfloat16_autocast_every_matmul_of_the_op_and_its_backward_is_bfloat16():
    """The training passes' contract: forward and backward run as two autocast linears would
    (bfloat16 products, float32 accumulation), close to that reference, and the float32 factors
    still get float32 gradients; without autocast the op keeps its float32 intermediate."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 48, generator=gen)
    U = torch.randn(40, 12, generator=gen).requires_grad_()
    V = (torch.randn(48, 12, generator=gen) / 7).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), _MatmulDtypes() as record:
        y = lowrank_linear(x, U, V)
        y.float().square().sum().backward()
    assert len(record.seen) >= 5 and all(dtypes == {torch.bfloat16} for dtypes in record.seen)  # 2 forward, 3+ backward
    assert U.grad.dtype == V.grad.dtype == torch.float32
    first, second = torch.nn.Linear(48, 12, bias=False), torch.nn.Linear(12, 40, bias=False)
    with torch.no_grad():
        first.weight.copy_(V.T)
        second.weight.copy_(U)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = second(first(x))
    reference.float().square().sum().backward()
    torch.testing.assert_close(y, reference, rtol=1e-2, atol=1e-2 * float(reference.abs().max()))
    torch.testing.assert_close(U.grad, second.weight.grad, rtol=2e-2, atol=2e-2 * float(U.grad.abs().max()))
    torch.testing.assert_close(V.grad, first.weight.grad.T, rtol=2e-2, atol=2e-2 * float(V.grad.abs().max()))
    with torch.no_grad(), _MatmulDtypes() as record:  # no_grad: the op's math runs in view of the mode
        lowrank_linear(x.bfloat16(), U.bfloat16(), V.bfloat16())
    assert record.seen and all(dtypes == {torch.float32} for dtypes in record.seen)


def test_autocast_runs_the_op_in_its_dtype_and_trains_float32_factors():
    """Under CPU bfloat16 autocast (as ``F.linear`` is) the result is bfloat16 and close to float64
    math; the float32 factors get float32 gradients close to float64 autograd's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 48, generator=gen)
    U = torch.randn(40, 12, generator=gen).requires_grad_()
    V = (torch.randn(48, 12, generator=gen) / 7).requires_grad_()
    bias = torch.randn(40, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lowrank_linear(x, U, V, bias)
    assert y.dtype == torch.bfloat16
    U64, V64 = (t.detach().double().requires_grad_() for t in (U, V))
    y64 = (x.double() @ V64) @ U64.T + bias.double()
    torch.testing.assert_close(y.double(), y64.detach(), rtol=3e-2, atol=3e-2 * float(y64.detach().abs().max()))
    y.float().square().sum().backward()
    y64.square().sum().backward()
    for got, want in ((U.grad, U64.grad), (V.grad, V64.grad)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2 * float(want.abs().max()))
