"""Error-compensating refits: the closed form against float64 reduced-rank regression, and the
compressed stream against the dense model."""

from __future__ import annotations

import copy

import pytest
import torch

from lowrank_infer.allocation import UniformConfig
from lowrank_infer.compensation import compensated_factors, refit
from lowrank_infer.compress import analyze, compress
from lowrank_infer.factorize import whitened_svd
from lowrank_infer.surgery import apply_plan

from tiny_models import tiny_model

GEN = torch.Generator().manual_seed(11)


def _reduced_rank_regression(W, X, Xc, rank, lam):
    """min ‖X Wᵀ − X̃ Aᵀ‖² + lam‖A − W‖² over rank-``rank`` A, by the textbook route: stack the
    ridge as extra rows, least squares, then project the fitted values on their top directions."""
    n = W.shape[1]
    Z = torch.cat([Xc, lam**0.5 * torch.eye(n, dtype=W.dtype)])
    Y = torch.cat([X @ W.T, lam**0.5 * W.T])
    B = torch.linalg.lstsq(Z, Y).solution  # [n, m], the unconstrained Aᵀ
    _, _, Qh = torch.linalg.svd(Z @ B, full_matrices=False)
    Q = Qh[:rank].T
    return (B @ Q @ Q.T).T


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_refit_is_the_float64_reduced_rank_regression(rank):
    m, n, tokens, ridge = 7, 6, 40, 0.05
    W = torch.randn(m, n, generator=GEN, dtype=torch.float64)
    X = torch.randn(tokens, n, generator=GEN, dtype=torch.float64) * torch.linspace(0.2, 3, n, dtype=torch.float64)
    Xc = X + 0.3 * torch.randn(tokens, n, generator=GEN, dtype=torch.float64)
    gram, cross = Xc.T @ Xc, X.T @ Xc
    U, V = refit(W, gram, cross, rank, ridge=ridge)
    lam = ridge * float(gram.diagonal().median())
    want = _reduced_rank_regression(W, X, Xc, rank, lam)
    torch.testing.assert_close((U.double() @ V.double().T), want, rtol=1e-4, atol=1e-5)


def test_with_equal_streams_and_a_tiny_ridge_it_is_whitened_svd():
    W = torch.randn(8, 6, generator=GEN, dtype=torch.float64)
    X = torch.randn(50, 6, generator=GEN, dtype=torch.float64)
    U, V = refit(W, X.T @ X, X.T @ X, 3, ridge=1e-9)
    Uw, Vw = whitened_svd(W, X.T @ X, max_rank=3).factors(3)
    torch.testing.assert_close(U.double() @ V.double().T, Uw.double() @ Vw.double().T, rtol=1e-4, atol=1e-5)


def test_a_non_positive_ridge_is_refused():
    with pytest.raises(ValueError, match="ridge must be > 0"):
        refit(torch.eye(3), torch.eye(3), torch.eye(3), 1, ridge=0.0)


def _final_hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1].double()


def test_compensation_brings_the_compressed_stream_closer_to_the_dense_one():
    model = tiny_model("llama").eval()
    ids = torch.randint(3, 128, (16, 24), generator=GEN)
    plan, spectra, _ = analyze(model, UniformConfig(keep=0.3), calib_ids=ids, progress=False)
    refitted = compensated_factors(model, plan, ids, batch_size=4, progress=False).factors
    dense = _final_hidden(model, ids)
    plain = apply_plan(copy.deepcopy(model), plan, lambda name, rank: spectra[name].factors(rank))
    compensated = apply_plan(copy.deepcopy(model), plan, lambda name, rank: refitted[name])
    error = {kind: (_final_hidden(m, ids) - dense).norm().item() for kind, m in
             (("plain", plain), ("compensated", compensated))}
    assert error["compensated"] < 0.9 * error["plain"], error
    assert set(refitted) == {name for name, rank in plan.ranks.items() if rank is not None}


def test_the_first_group_of_block_zero_is_plain_whitened_svd():
    """Both streams agree before anything is compressed: q/k/v of block 0 get SVD-LLM's factors."""
    model = tiny_model("llama").eval()
    ids = torch.randint(3, 128, (8, 24), generator=GEN)
    plan, spectra, _ = analyze(model, UniformConfig(keep=0.5), calib_ids=ids, progress=False)
    refitted = compensated_factors(model, plan, ids, ridge=1e-9, progress=False).factors
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        U, V = refitted[name]
        Us, Vs = spectra[name].factors(plan[name].rank)
        torch.testing.assert_close(U @ V.T, Us @ Vs.T, rtol=1e-3, atol=1e-4)
    later = "model.layers.1.mlp.down_proj"
    U, V = refitted[later]
    Us, Vs = spectra[later].factors(plan[later].rank)
    assert (U @ V.T - Us @ Vs.T).abs().max() > 1e-3  # later layers see other inputs


def test_compress_sequential_leaves_dense_layers_and_records_it():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (8, 24), generator=GEN)
    plan = compress(model, UniformConfig(keep=0.5, sequential=True), calib_ids=ids, progress=False).plan
    assert plan.params["sequential"] is True and plan.params["ridge"] == 0.01
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(tiny_model("qwen2"), UniformConfig(keep=0.5, whiten=False, sequential=True), progress=False)


def test_a_plan_refitted_sequentially_needs_no_whitened_svd():
    from lowrank_infer.allocation import uniform_plan
    from lowrank_infer.module import LowRankLinear
    from lowrank_infer.structure import target_shapes

    model = tiny_model("llama").eval()
    ids = torch.randint(3, 128, (8, 24), generator=GEN)
    plan = uniform_plan(target_shapes(model), 0.5)
    reference = compensated_factors(model, plan, ids, progress=False).factors
    result = compress(model, UniformConfig(keep=0.5, sequential=True), plan=plan, calib_ids=ids, progress=False)
    assert set(result.seconds) == {"compensation"}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            torch.testing.assert_close(module.U, reference[name][0])
            torch.testing.assert_close(module.V, reference[name][1])


def test_a_plan_passed_in_is_not_changed_by_sequential_refitting():
    from lowrank_infer.allocation import uniform_plan
    from lowrank_infer.structure import target_shapes

    model = tiny_model("llama").eval()
    plan = uniform_plan(target_shapes(model), 0.5)
    before = plan.to_dict()
    ids = torch.randint(3, 128, (4, 16), generator=GEN)
    result = compress(model, UniformConfig(keep=0.5, sequential=True), plan=plan, calib_ids=ids, progress=False)
    assert plan.to_dict() == before and result.plan.params["sequential"] is True
    assert result.plan.ranks == plan.ranks


def test_shrinkage_with_a_plan_refitted_sequentially_is_refused():
    """The refit never reads the whitened SVD that shrinkage shapes: refused, not silently ignored."""
    from lowrank_infer.allocation import uniform_plan
    from lowrank_infer.structure import target_shapes

    model = tiny_model("llama").eval()
    plan = uniform_plan(target_shapes(model), 0.5)
    ids = torch.randint(3, 128, (4, 16), generator=GEN)
    with pytest.raises(ValueError, match="shrinkage shapes the whitened SVD"):
        compress(model, UniformConfig(keep=0.5, sequential=True, shrinkage=0.1), plan=plan, calib_ids=ids,
                 progress=False)
    # Without a plan the allocator reads the shrunk spectra; analyze records the strength.
    analyzed = analyze(tiny_model("llama").eval(), UniformConfig(keep=0.5, shrinkage=0.1), calib_ids=ids,
                       progress=False)
    assert analyzed[0].params["shrinkage"] == 0.1
