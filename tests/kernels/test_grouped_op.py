"""``lowrank_grouped_linear``: one shrink over concatenated right factors, one expand per linear."""

from __future__ import annotations

import pytest
import torch

from lowrank_infer.kernels import lowrank_grouped_linear


def _inputs(dtype, ranks=(5, 3, 7), rows=(12, 4, 4), n=16, tokens=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, n, generator=g).to(dtype)
    Us = [(torch.randn(m, k, generator=g) / k**0.5).to(dtype) for m, k in zip(rows, ranks)]
    Vs = [(torch.randn(n, k, generator=g) / n**0.5).to(dtype) for k in ranks]
    bias = torch.randn(sum(rows), generator=g).to(dtype)
    return x, Us, Vs, bias


def _float64(x, Us, Vs, bias):
    """Each linear on its own, ``x V_i U_iᵀ`` in float64, then concatenated."""
    y = torch.cat([x.double() @ V.double() @ U.double().T for U, V in zip(Us, Vs)], dim=-1)
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_each_linear_in_float64(dtype, with_bias):
    x, Us, Vs, bias = _inputs(dtype)
    bias = bias if with_bias else None
    got = lowrank_grouped_linear(x, torch.cat(Vs, dim=1), Us, bias)
    assert got.dtype == dtype and got.shape == (2, 6, 20)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), _float64(x, Us, Vs, bias), rtol=tol, atol=tol)


def test_the_registered_op_passes_opcheck():
    x, Us, Vs, bias = _inputs(torch.float32)
    op = torch.ops.lowrank_infer.lowrank_grouped_linear.default
    torch.library.opcheck(op, (x, torch.cat(Vs, dim=1), Us, bias))
    torch.library.opcheck(op, (x, torch.cat(Vs, dim=1), Us, None))
    torch.testing.assert_close(op(x, torch.cat(Vs, dim=1), Us, bias).double(), _float64(x, Us, Vs, bias),
                               rtol=1e-5, atol=1e-5)


def test_torch_compile_traces_the_op():
    x, Us, Vs, bias = _inputs(torch.float32)
    V = torch.cat(Vs, dim=1)
    seen = []

    def backend(gm, _inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    compiled = torch.compile(lambda x: lowrank_grouped_linear(x, V, Us, bias), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x).double(), _float64(x, Us, Vs, bias), rtol=1e-5, atol=1e-5)
    assert any("lowrank_grouped_linear" in target for target in seen)


def test_ranks_that_do_not_fit_v_are_refused():
    x, Us, Vs, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"ranks \[5, 3, 7\].*do not fit V \(16, 14\)"):
        lowrank_grouped_linear(x, torch.cat(Vs, dim=1)[:, :14], Us)
    with pytest.raises(ValueError, match="lowrank_linear"):
        lowrank_grouped_linear(x[..., :8], torch.cat(Vs, dim=1), Us)
