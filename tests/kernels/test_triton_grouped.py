"""The Triton grouped and gated launchers (interpreter on CPU, compiled on CUDA) against float64."""

import pytest
import torch
import torch.nn.functional as F

from lowrank_infer.kernels import triton_gated_linear, triton_grouped_linear

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
# T <= 32 runs the decode kernels (the shrink split in-kernel below), T = 40 the tiled GEMMs.
TOKENS = (1, 17, 40)


def _factors(dtype, device, ranks, rows, n=37, T=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=g)
    Us = [torch.randn(m, k, generator=g) / k**0.5 for m, k in zip(rows, ranks)]
    Vs = [torch.randn(n, k, generator=g) / n**0.5 for k in ranks]
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), [cast(U) for U in Us], [cast(V) for V in Vs]


def _rel_err(got, ref):
    assert got.dtype != torch.float64 and torch.isfinite(got).all()
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_grouped_matches_each_linear_in_float64(triton_device, split_shrink, counters, dtype, T, with_bias):
    """q/k/v-like: three ranks, rows 24/8/8, one shrink over V = [V_q | V_k | V_v]."""
    x, Us, Vs = _factors(dtype, triton_device, ranks=(20, 7, 33), rows=(24, 8, 8), T=T)
    bias = torch.randn(40).to(triton_device, dtype) if with_bias else None
    got = triton_grouped_linear(x, torch.cat(Vs, dim=1), Us, bias)
    ref = torch.cat([x.double() @ V.double() @ U.double().T for U, V in zip(Us, Vs)], dim=-1)
    ref = ref if bias is None else ref + bias.double()
    assert got.shape == (T, 40) and got.dtype == dtype
    assert _rel_err(got, ref) < TOLERANCE[dtype]
    assert not counters(triton_device).any()


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("layout", ["side_by_side", "shared_v"])
def test_gated_matches_float64(triton_device, split_shrink, activation, dtype, T, layout):
    """``act(x V_g U_gᵀ) * (x V_u U_uᵀ)``: side by side (gate_proj, up_proj), or one shared V
    (a factorized fused gate_up_proj, up_start = 0), against float64 torch math."""
    ranks = (20, 33) if layout == "side_by_side" else (20, 20)
    x, (U_g, U_u), (V_g, V_u) = _factors(dtype, triton_device, ranks=ranks, rows=(40, 40), T=T)
    if layout == "side_by_side":
        V, up_start = torch.cat([V_g, V_u], dim=1), None
    else:
        V, V_u, up_start = V_g, V_g, 0
    got = triton_gated_linear(x, V, U_g, U_u, up_start, activation)
    gate = x.double() @ V_g.double() @ U_g.double().T
    up = x.double() @ V_u.double() @ U_u.double().T
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    assert got.shape == (T, 40) and got.dtype == dtype
    assert _rel_err(got, act * up) < TOLERANCE[dtype]


def test_gated_leaves_no_counter_and_repeats_bit_for_bit(triton_device, split_shrink, counters):
    x, (U_g, U_u), (V_g, V_u) = _factors(torch.float32, triton_device, ranks=(20, 33), rows=(40, 40), T=5)
    V = torch.cat([V_g, V_u], dim=1)
    first = triton_gated_linear(x, V, U_g, U_u)
    for _ in range(2):
        assert torch.equal(first, triton_gated_linear(x, V, U_g, U_u))
        assert not counters(triton_device).any()


def test_bad_groups_are_refused(triton_device):
    x, (U_g, U_u), (V_g, V_u) = _factors(torch.float32, triton_device, ranks=(20, 33), rows=(40, 40))
    V = torch.cat([V_g, V_u], dim=1)
    with pytest.raises(ValueError, match="activation 'relu' is not one of"):
        triton_gated_linear(x, V, U_g, U_u, activation="relu")
    with pytest.raises(ValueError, match=r"up columns \[20, 53\) must lie in V's 52"):
        triton_gated_linear(x, V[:, :52], U_g, U_u)
    with pytest.raises(ValueError, match="same rows"):
        triton_gated_linear(x, V, U_g, U_u[:30])
    with pytest.raises(ValueError, match=r"ranks \[20, 33\].*do not fit"):
        triton_grouped_linear(x, V[:, :50], [U_g, U_u])
