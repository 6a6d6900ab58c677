"""``lowrank_gated_linear``: a gated MLP's low-rank gate and up projections, activation applied."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowrank_infer.kernels import ACTIVATIONS, lowrank_gated_linear


def _inputs(dtype, k_gate=5, k_up=7, m=12, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, n, generator=g).to(dtype)
    U_gate = (torch.randn(m, k_gate, generator=g) / k_gate**0.5).to(dtype)
    U_up = (torch.randn(m, k_up, generator=g) / k_up**0.5).to(dtype)
    V = (torch.randn(n, k_gate + k_up, generator=g) / n**0.5).to(dtype)
    return x, V, U_gate, U_up


def _float64(x, V, U_gate, U_up, up_start, activation):
    z = x.double() @ V.double()
    gate = z[..., :U_gate.shape[1]] @ U_gate.double().T
    up = z[..., up_start:up_start + U_up.shape[1]] @ U_up.double().T
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return act * up


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64(dtype, activation):
    x, V, U_gate, U_up = _inputs(dtype)
    got = lowrank_gated_linear(x, V, U_gate, U_up, activation=activation)
    assert got.dtype == dtype and got.shape == (2, 3, 12)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), _float64(x, V, U_gate, U_up, 5, activation), rtol=tol, atol=tol)


def test_shared_factor_matches_a_fused_gate_up_projection():
    """A factorized fused gate_up_proj (Phi-3): one V, U's rows split in gate and up halves."""
    x, V, U, _ = _inputs(torch.float32, k_gate=6, k_up=0, m=24)
    got = lowrank_gated_linear(x, V, U[:12], U[12:], up_start=0)
    gate, up = (x.double() @ V.double() @ U.double().T).chunk(2, dim=-1)
    torch.testing.assert_close(got.double(), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


def test_the_registered_op_passes_opcheck_and_compiles():
    x, V, U_gate, U_up = _inputs(torch.float32)
    op = torch.ops.lowrank_infer.lowrank_gated_linear.default
    torch.library.opcheck(op, (x, V, U_gate, U_up, 5, "gelu_tanh"))
    seen = []

    def backend(gm, _inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    compiled = torch.compile(lambda x: lowrank_gated_linear(x, V, U_gate, U_up), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x).double(), _float64(x, V, U_gate, U_up, 5, "silu"), rtol=1e-5, atol=1e-5)
    assert any("lowrank_gated_linear" in target for target in seen)


def test_bad_factors_are_refused():
    x, V, U_gate, U_up = _inputs(torch.float32)
    with pytest.raises(ValueError, match="activation 'gelu' is not one of"):
        lowrank_gated_linear(x, V, U_gate, U_up, activation="gelu")
    with pytest.raises(ValueError, match=r"up columns \[6, 13\) must lie in V's 12"):
        lowrank_gated_linear(x, V, U_gate, U_up, up_start=6)
    with pytest.raises(ValueError, match="one dtype"):
        lowrank_gated_linear(x, V, U_gate, U_up.double())
    with pytest.raises(ValueError, match="lowrank_linear: x's last dim"):
        lowrank_gated_linear(x[..., :8], V, U_gate, U_up)
