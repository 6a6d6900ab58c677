"""Factorize one weight: truncation-aware whitened SVD (SVD-LLM) or plain SVD.

Both return a :class:`Spectrum`, which holds the singular values that rank allocation reads and
factors that can be cut at any rank up to ``max_rank`` without another SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Spectrum", "cholesky_damped", "plain_svd", "shrink_gram", "whitened_svd"]


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
    """

    sigma: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    whitened: bool

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
    try:
        L, _ = cholesky_damped(shrink_gram(gram.to(W.device, torch.float64), shrinkage), damping)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    U, sigma, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    k = _cap(max_rank, sigma.numel())
    root = sigma[:k].sqrt()
    left = U[:, :k] * root
    # V = L⁻ᵀ·V_kᵀ·Σ^½ as a triangular solve: never form L⁻¹ explicitly.
    right = torch.linalg.solve_triangular(L.T, Vh[:k].T * root, upper=True)
    return Spectrum(sigma.cpu(), left.float().cpu(), right.float().cpu(), whitened=True)


def plain_svd(weight: torch.Tensor, *, max_rank: int | None = None, name: str = "weight") -> Spectrum:
    """Truncated SVD of the weight itself (the baseline whitening is compared against)."""
    W = _check_weight(weight, name)
    U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
    k = _cap(max_rank, sigma.numel())
    root = sigma[:k].sqrt()
    return Spectrum(sigma.cpu(), (U[:, :k] * root).float().cpu(), (Vh[:k].T * root).float().cpu(), whitened=False)
