"""The registered op: dispatch, torch.compile, opcheck, autograd, import hygiene."""

import subprocess
import sys

import pytest
import torch

from lowrank_infer.kernels import lowrank_linear, torch_lowrank_linear, triton_lowrank_linear, two_matmul_linear


class _TwoLayer(torch.nn.Module):
    def __init__(self, n=24, k=7, hidden=37):
        super().__init__()
        self.U1 = torch.nn.Parameter(torch.randn(hidden, k) / k**0.5)
        self.V1 = torch.nn.Parameter(torch.randn(n, k) / n**0.5)
        self.b1 = torch.nn.Parameter(torch.randn(hidden))
        self.U2 = torch.nn.Parameter(torch.randn(n, k) / k**0.5)
        self.V2 = torch.nn.Parameter(torch.randn(hidden, k) / hidden**0.5)

    def forward(self, x):
        h = torch.nn.functional.gelu(lowrank_linear(x, self.U1, self.V1, self.b1))
        return lowrank_linear(h, self.U2, self.V2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dispatch_matches_reference(device, dtype, make_inputs, assert_matches_reference):
    x, U, V, b = make_inputs(5, 37, 24, 7, dtype, device, lead=(2,))
    assert_matches_reference(lowrank_linear(x, U, V, b), x, U, V, b)


def test_cpu_uses_the_fp32_intermediate_path():
    """In fp16 the fp32-intermediate path and two fp16 matmuls round differently: the CPU
    dispatch must be the former, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    x, U, V = (torch.randn(*shape, generator=gen).half() for shape in ((3, 240), (37, 70), (240, 70)))
    assert not torch.equal(two_matmul_linear(x, U, V), torch_lowrank_linear(x, U, V))
    assert torch.equal(lowrank_linear(x, U, V), torch_lowrank_linear(x, U, V))


def test_torch_compile_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    model = _TwoLayer().to(device)
    x = torch.randn(2, 5, 24, device=device)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_backward_matches_eager(device):
    torch.manual_seed(0)
    model = _TwoLayer().to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 5, 24, device=device)
    grads = []
    for run in (model, compiled):
        model.zero_grad()
        run(x).square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-5)


def test_opcheck(device):
    x = torch.randn(2, 3, 24, device=device, requires_grad=True)
    U = torch.randn(37, 7, device=device, requires_grad=True)
    V = torch.randn(24, 7, device=device, requires_grad=True)
    b = torch.randn(37, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.lowrank_infer.lowrank_linear.default, (x, U, V, b))
    torch.library.opcheck(torch.ops.lowrank_infer.lowrank_linear.default, (x, U, V, None))


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients_match_autograd_of_reference(device, with_bias):
    torch.manual_seed(0)
    leaves = [torch.randn(2, 3, 24), torch.randn(37, 7), torch.randn(24, 7), torch.randn(37)]
    ours = [t.to(device).requires_grad_() for t in leaves]
    theirs = [t.to(device).requires_grad_() for t in leaves]
    if not with_bias:
        ours[3] = theirs[3] = None
    grad_y = torch.randn(2, 3, 37, device=device)
    lowrank_linear(*ours).backward(grad_y)
    torch_lowrank_linear(*theirs).backward(grad_y)
    for mine, ref in zip(ours, theirs):
        if mine is not None:
            torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_import_does_not_initialise_cuda_or_load_triton():
    code = ("import sys, torch, lowrank_infer.kernels; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; "
            "assert 'lowrank_infer.kernels.triton_lowrank' not in sys.modules, 'launcher imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_triton_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    x, U, V = torch.randn(3, 24), torch.randn(37, 7), torch.randn(24, 7)
    with pytest.raises(ImportError, match="pip install 'lowrank-infer\\[triton\\]'"):
        triton_lowrank_linear(x, U, V)
    assert lowrank_linear(x, U, V).shape == (3, 37)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["cublas", "triton"])
@pytest.mark.parametrize("T", [1, 17, 130])
def test_cuda_graph_capture(backend, name, T, make_inputs, assert_matches_reference):
    backend(name)  # T picks each Triton path: decode, prefill, shrink/expand (k = 300)
    x, U, V, b = make_inputs(T, 37, 24, 300 if T == 130 else 33, torch.float16, "cuda")
    lowrank_linear(x, U, V, b)  # compile and cache configs outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lowrank_linear(x, U, V, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(y, x, U, V, b)


@pytest.fixture
def backend():
    """Set the CUDA backend for one test and restore it afterwards."""
    from lowrank_infer.kernels import get_backend, set_backend

    saved = get_backend()
    yield set_backend
    set_backend(saved)


@pytest.mark.parametrize("name", ["cublas", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_each_cuda_backend_matches_reference(backend, name, dtype, make_inputs, assert_matches_reference):
    if not torch.cuda.is_available():
        pytest.skip("CUDA backends need a GPU")
    backend(name)
    x, U, V, b = make_inputs(5, 37, 24, 7, dtype, "cuda", lead=(2,))
    assert_matches_reference(lowrank_linear(x, U, V, b), x, U, V, b)


def test_unknown_backend_is_refused(backend):
    with pytest.raises(ValueError, match="unknown backend 'cutlass'"):
        backend("cutlass")
