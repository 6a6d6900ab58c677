"""Factorize one weight: truncation-aware whitened SVD (SVD-LLM) or plain SVD.

Both return a :class:`Spectrum`, which holds the singular values that rank allocation reads and
factors that can be cut at any rank up to ``max_rank`` without another SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["AUTO", "SHRINKAGE_GRID", "Spectrum", "cholesky_damped", "held_out_shrinkage", "plain_svd", "shrink_gram", "whitened_svd"]

# The strengths ``shrinkage="auto"`` chooses among (0 included: no shrinkage when none pays).
AUTO, SHRINKAGE_GRID = "auto", (0.0, 0.03, 0.1, 0.3)


@dataclass
class Spectrum:
    """A weight's (whitened) singular values and the factors they give at any rank.

    ``left[:, :k] @ right[:, :k].T`` is the best rank-``k`` approximation of the weight: in the
    data norm ``‖(W − W')X‖`` when ``whitened``, else in the Frobenius norm.

    Attributes:
        sigma: ``[r]`` float64 singular values, descending (all of them, for allocation).
        left: ``[m, max_rank]`` float32, ``U_r·Σ^½``.
        right: ``[n, max_rank]`` float32, ``S⁻ᵀ·V_r·Σ^½`` (``S`` = whitening; identity when plain).
        whitened: whether ``sigma`` are singular values of ``W·S``.
        shrinkage: the strength the whitening's Gram was shrunk by (:func:`shrink_gram`).
    """

    sigma: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    whitened: bool
    shrinkage: float = 0.0

    @classmethod
    def empty(cls, out_features: int, in_features: int, max_rank: int, *, whitened: bool) -> "Spectrum":
        """An uninitialized spectrum of the shapes ``whitened_svd``/``plain_svd`` give for these
        arguments (a buffer to receive one, e.g. by broadcast)."""
        k = _cap(max_rank, min(out_features, in_features))
        return cls(torch.empty(min(out_features, in_features), dtype=torch.float64),
                   torch.empty(out_features, k), torch.empty(in_features, k), whitened)

    @property
    def out_features(self) -> int:
        return self.left.shape[0]

    @property
    def in_features(self) -> int:
        return self.right.shape[0]

    @property
    def max_rank(self) -> int:
        return self.left.shape[1]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U [m, rank], V [n, rank])`` with ``W ≈ U @ V.T``."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} is outside the stored factors' range 1..{self.max_rank}")
        return self.left[:, :rank], self.right[:, :rank]

    def relative_error(self, rank: int) -> float:
        """Relative truncation error ``‖Σ_{>rank}‖ / ‖Σ‖`` (in the whitened norm when whitened)."""
        energy = self.sigma.square()
        total = float(energy.sum())
        return math.sqrt(float(energy[rank:].sum()) / total) if total > 0 else 0.0


def cholesky_damped(gram: torch.Tensor, damping: float = 0.0, max_tries: int = 10) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``gram + λ·mean(diag)·I``, raising λ tenfold until it succeeds.

    Calibration Gram matrices are often singular (dead features, fewer tokens than features), so
    a failed factorization is retried with damping from 1e-8 upwards rather than given up on.

    Returns:
        ``(L, λ)`` with the relative damping ``λ`` that was needed.
    """
    gram = gram.to(torch.float64)
    if not torch.isfinite(gram).all():
        raise ValueError("calibration statistics (XᵀX) contain NaN or Inf")
    scale = float(gram.diagonal().mean())
    if scale <= 0:
        raise ValueError("calibration statistics (XᵀX) are all zero: the layer never saw non-zero input")
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    lam = damping
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(gram + (lam * scale) * eye)
        if int(info) == 0:
            return L, lam
        lam = 1e-8 if lam == 0 else lam * 10
    raise ValueError(f"XᵀX is not positive definite even with relative damping {lam / 10:g}")


def shrink_gram(gram: torch.Tensor, strength: float) -> torch.Tensor:
    """``(1 − s)·XᵀX + s·median(diag)·I``: the Gram pulled toward a scaled identity.

    A whitening fitted on a few calibration windows trusts their small eigenvalues fully, and
    so protects only the directions that text excites; text of another kind pays for it.
    Shrinkage bounds that trust. The median sets the identity's scale because the mean is
    dominated by the few massive-activation features some models have (SmolLM2 among them).
    """
    if not (0.0 <= strength < 1.0):
        raise ValueError(f"shrinkage must be in [0, 1), got {strength!r}")
    if strength == 0.0:
        return gram
    shrunk = gram * (1.0 - strength)  # one n×n copy: no identity matrix is formed
    shrunk.diagonal().add_(strength * float(gram.diagonal().median()))
    return shrunk


def _check_weight(weight: torch.Tensor, name: str) -> torch.Tensor:
    if weight.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}: weight contains NaN or Inf")
    return weight.detach().to(torch.float64)


def _cap(max_rank: int | None, r: int) -> int:
    return r if max_rank is None else max(1, min(int(max_rank), r))


def whitened_svd(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    max_rank: int | None = None,
    damping: float = 0.0,
    shrinkage: float = 0.0,
    name: str = "weight",
) -> Spectrum:
    """SVD-LLM's truncation-aware whitening: ``S = chol(XᵀX)``, ``W·S = UΣVᵀ``.

    Truncating ``W·S`` at rank ``k`` minimizes ``‖(W − W')X‖_F`` because ``‖AX‖_F = ‖A·S‖_F`` when
    ``XᵀX = S·Sᵀ``. The factors are ``U = U_k Σ_k^½`` and ``V = (Σ_k^½ V_kᵀ S⁻¹)ᵀ``.

    Args:
        weight: ``[m, n]`` dense weight.
        gram: ``[n, n]`` sum of ``x xᵀ`` over calibration inputs (any float dtype; used in float64).
        max_rank: keep factors up to this rank (default: all).
        damping: initial relative damping of ``gram`` (raised automatically when needed).
        shrinkage: pull ``gram`` toward a scaled identity first (:func:`shrink_gram`; 0 = none).
        name: layer name for error messages.
    """
    W = _check_weight(weight, name)
    if gram.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"{name}: XᵀX is {tuple(gram.shape)}, expected {(W.shape[1], W.shape[1])}")
    L = _whitening(gram.to(W.device, torch.float64), shrinkage, damping, name)
    sigma, left, right = _whitened_factors(W, L, _cap(max_rank, min(W.shape)))
    return Spectrum(sigma.cpu(), left.float().cpu(), right.float().cpu(), whitened=True, shrinkage=float(shrinkage))


def _whitening(gram: torch.Tensor, shrinkage: float, damping: float, name: str) -> torch.Tensor:
    """``chol`` of the shrunk Gram, its errors naming the layer."""
    try:
        return cholesky_damped(shrink_gram(gram, shrinkage), damping)[0]
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _whitened_factors(W: torch.Tensor, L: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(σ, U_k·Σ_k^½, L⁻ᵀ·V_k·Σ_k^½)`` of ``W·L`` in float64."""
    U, sigma, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    root = sigma[:k].sqrt()
    # V = L⁻ᵀ·V_kᵀ·Σ^½ as a triangular solve: never form L⁻¹ explicitly.
    return sigma, U[:, :k] * root, torch.linalg.solve_triangular(L.T, Vh[:k].T * root, upper=True)


def held_out_shrinkage(weight: torch.Tensor, folds: tuple[torch.Tensor, torch.Tensor], rank: int, *,
                       grid: tuple[float, ...] = SHRINKAGE_GRID, name: str = "weight") -> float:
    """The strength in ``grid`` whose rank-``rank`` factors generalize best, by two-fold cross-validation.

    Factors fitted on one fold's Gram (shrunk) are scored by the output error they leave on the
    other fold's inputs, ``tr(ΔW·G_held·ΔWᵀ)``, both ways round; the strength with the lowest sum
    wins (ties: the smaller one). Shrinkage pays only where one half of the windows fails to
    predict the other, which is what a whitening fitted on all of them would meet on new text.

    Args:
        weight: ``[m, n]`` dense weight.
        folds: two ``[n, n]`` Grams, of disjoint halves of the calibration windows.
        rank: the rank the factors are judged at.
    """
    W = _check_weight(weight, name)
    grams = [g.to(W.device, torch.float64) for g in folds]
    if any(float(g.diagonal().sum()) <= 0 for g in grams):
        raise ValueError(f"{name}: shrinkage='auto' needs calibration windows in both halves (2 or more windows)")
    errors = []
    for strength in grid:
        error = 0.0
        for fit, held in ((grams[0], grams[1]), (grams[1], grams[0])):
            _, left, right = _whitened_factors(W, _whitening(fit, strength, 0.0, name), _cap(rank, min(W.shape)))
            delta = W - left @ right.T
            error += float(((delta @ held) * delta).sum())
        errors.append(error)
    return grid[min(range(len(grid)), key=lambda i: (errors[i], i))]


def plain_svd(weight: torch.Tensor, *, max_rank: int | None = None, name: str = "weight") -> Spectrum:
    """Truncated SVD of the weight itself (the baseline whitening is compared against)."""
    W = _check_weight(weight, name)
    U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
    k = _cap(max_rank, sigma.numel())
    root = sigma[:k].sqrt()
    return Spectrum(sigma.cpu(), (U[:, :k] * root).float().cpu(), (Vh[:k].T * root).float().cpu(), whitened=False)
