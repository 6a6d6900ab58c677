import pytest
import torch

from lowrank_infer.factorize import SHRINKAGE_GRID, cholesky_damped, held_out_shrinkage, plain_svd, shrink_gram, whitened_svd


def _correlated_inputs(tokens=2000, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    scale = torch.logspace(-2, 1, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ (mix * scale)


@pytest.mark.parametrize("rank", [4, 12, 24])
def test_whitened_beats_plain_under_the_data(rank):
    X = _correlated_inputs()
    W = torch.randn(40, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gram = X.T @ X
    def data_err(spectrum):
        U, V = spectrum.factors(rank)
        return torch.linalg.matrix_norm((W - U.double() @ V.double().T) @ X.T)
    white, plain = whitened_svd(W, gram), plain_svd(W)
    assert data_err(white) < data_err(plain)
    # The whitened truncation is optimal: its data error is exactly the discarded whitened spectrum.
    torch.testing.assert_close(data_err(white), white.sigma[rank:].square().sum().sqrt(), rtol=1e-4, atol=0)
    assert white.relative_error(rank) == pytest.approx(
        float(white.sigma[rank:].square().sum().sqrt() / white.sigma.square().sum().sqrt())
    )


def test_full_rank_factors_reconstruct_the_weight():
    X = _correlated_inputs()
    W = torch.randn(20, 48, dtype=torch.float64)
    spectrum = whitened_svd(W, X.T @ X)
    U, V = spectrum.factors(spectrum.max_rank)
    torch.testing.assert_close(U.double() @ V.double().T, W, rtol=1e-4, atol=1e-4)


def test_max_rank_caps_stored_factors():
    spectrum = plain_svd(torch.randn(30, 20), max_rank=7)
    assert spectrum.max_rank == 7 and spectrum.sigma.numel() == 20
    with pytest.raises(ValueError, match="outside"):
        spectrum.factors(8)


def test_singular_gram_is_damped():
    X = _correlated_inputs(tokens=10, n=32)  # 10 tokens: XᵀX has rank 10 of 32
    L, lam = cholesky_damped(X.T @ X)
    assert lam > 0
    assert torch.isfinite(L).all()
    spectrum = whitened_svd(torch.randn(16, 32), X.T @ X)
    assert torch.isfinite(spectrum.right).all()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="layer.q.*NaN"):
        plain_svd(torch.tensor([[1.0, float("nan")]]), name="layer.q")
    gram = torch.eye(4, dtype=torch.float64)
    gram[0, 0] = float("inf")
    with pytest.raises(ValueError, match="down.*NaN or Inf"):
        whitened_svd(torch.randn(3, 4), gram, name="down")
    with pytest.raises(ValueError, match="all zero"):
        whitened_svd(torch.randn(3, 4), torch.zeros(4, 4), name="x")
    with pytest.raises(ValueError, match="expected"):
        whitened_svd(torch.randn(3, 4), torch.eye(5), name="x")


def test_shrinkage_whitens_with_the_shrunk_gram():
    """Against a float64 reference built here: SVD of W·chol((1 − s)G + s·median(diag G)·I)."""
    X = _correlated_inputs()
    W = torch.randn(24, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gram, s = X.T @ X, 0.3
    shrunk = (1 - s) * gram + s * torch.median(torch.diagonal(gram)) * torch.eye(48, dtype=torch.float64)
    want = torch.linalg.svdvals(W @ torch.linalg.cholesky(shrunk))
    got = whitened_svd(W, gram, shrinkage=s)
    torch.testing.assert_close(got.sigma, want, rtol=1e-9, atol=0)
    # The factors are the optimal rank-k fit in the shrunk metric: their error there is the tail.
    U, V = got.factors(8)
    D = W - U.double() @ V.double().T
    torch.testing.assert_close(torch.trace(D @ shrunk @ D.T).sqrt(), want[8:].square().sum().sqrt(), rtol=1e-4, atol=0)
    assert torch.equal(whitened_svd(W, gram, shrinkage=0.0).sigma, whitened_svd(W, gram).sigma)


def test_shrinkage_uses_the_median_not_a_massive_feature():
    gram = torch.diag(torch.tensor([1.0, 2.0, 3.0, 1e6], dtype=torch.float64))
    torch.testing.assert_close(shrink_gram(gram, 0.5).diagonal(),
                               torch.tensor([1.5, 2.0, 2.5, 5e5 + 1.0], dtype=torch.float64))  # lower median 2
    assert shrink_gram(gram, 0.0) is gram


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_shrinkage_outside_its_range_is_named(bad):
    with pytest.raises(ValueError, match=r"down: shrinkage must be in \[0, 1\)"):
        whitened_svd(torch.randn(4, 4), torch.eye(4), shrinkage=bad, name="down")


def _cv_error_reference(W, fit, held, rank, strength):
    """Held-out output error of the best rank-``rank`` fit in the shrunk-``fit`` metric, through
    a symmetric square root (eigh) instead of a Cholesky factor: an independent route to the
    same optimum ``[W·R]_k·R⁻¹``."""
    n = fit.shape[0]
    shrunk = (1 - strength) * fit + strength * fit.diagonal().median() * torch.eye(n, dtype=torch.float64)
    lam, Q = torch.linalg.eigh(shrunk)
    R = Q @ torch.diag(lam.sqrt()) @ Q.T
    U, S, Vh = torch.linalg.svd(W @ R)
    approx = (U[:, :rank] * S[:rank]) @ Vh[:rank] @ torch.linalg.inv(R)
    delta = W - approx
    return float(torch.trace(delta @ held @ delta.T))


def _fold_grams(tokens_per_fold, n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    folds = [torch.randn(tokens_per_fold, n, generator=g, dtype=torch.float64) @ mix for _ in range(2)]
    return [x.T @ x for x in folds]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_shrinkage_is_the_cross_validated_minimum(seed):
    """Few tokens per fold (noisy statistics): the choice is the argmin of the float64 reference's
    two-way held-out error over the grid."""
    n, m, rank = 24, 16, 6
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
    a, b = _fold_grams(30, n, seed)
    errors = [_cv_error_reference(W, a, b, rank, s) + _cv_error_reference(W, b, a, rank, s) for s in SHRINKAGE_GRID]
    assert held_out_shrinkage(W.float(), (a, b), rank) == SHRINKAGE_GRID[min(range(len(errors)), key=errors.__getitem__)]


def test_held_out_shrinkage_is_none_when_the_halves_agree():
    """Identical halves: the unshrunk fit is exactly optimal on the other one, so 0 must win."""
    W = torch.randn(12, 20, generator=torch.Generator().manual_seed(3))
    a, _ = _fold_grams(200, 20, 4)
    assert held_out_shrinkage(W, (a, a.clone()), 5) == 0.0


def test_held_out_shrinkage_needs_both_halves():
    a, _ = _fold_grams(30, 8, 0)
    with pytest.raises(ValueError, match="down: shrinkage='auto' needs calibration windows in both halves"):
        held_out_shrinkage(torch.randn(4, 8), (a, torch.zeros(8, 8, dtype=torch.float64)), 2, name="down")
