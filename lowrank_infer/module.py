"""``LowRankLinear``: a linear layer stored as two factors, or dense when that is not smaller."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_infer.factorize import plain_svd, whitened_svd
from lowrank_infer.kernels import check_factors, lowrank_linear, use_dense

__all__ = ["LowRankLinear"]


class LowRankLinear(nn.Module):
    """``y = U·(Vᵀx) + b`` with ``U: [out_features, k]`` and ``V: [in_features, k]``.

    ``V`` is stored rank-major (``V.T`` is contiguous): ``from_factors`` copies into that layout,
    whatever the source's; a loaded checkpoint is converted when it is packed
    (:func:`lowrank_infer.pack_model`, which loading runs).

    A layer whose rank is ``None`` or at/past break-even (``k·(m+n) ≥ m·n``) runs in dense mode
    with a plain ``weight``; the choice is made once, here, so the forward pass never branches on it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        dense_fallback: bool = True,
    ) -> None:
        super().__init__()
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1 or None (dense), got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        dense = rank is None or (dense_fallback and use_dense(out_features, in_features, rank))
        self.rank = None if dense else int(rank)
        kw = {"device": device, "dtype": dtype}
        if dense:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        else:
            self.U = nn.Parameter(torch.empty(out_features, self.rank, **kw))
            # Rank-major: V [n, k] is the transposed view of a contiguous Vᵀ [k, n], the one copy
            # there is. The kernels read whole rows of Vᵀ, and the factors of layers that share
            # an input stack into one Vᵀ without copying (lowrank_infer.packing).
            self.V = nn.Parameter(torch.empty(self.rank, in_features, **kw).T)
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    @property
    def is_dense(self) -> bool:
        return self.rank is None

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        """Wrap given factors (``W ≈ U @ V.T``); the result is low-rank even past break-even.

        The factors are checked here, once (:func:`~lowrank_infer.kernels.check_factors`), so
        that ``forward`` checks only its input.

        Raises:
            ValueError: shapes, dtypes or devices of ``U``, ``V`` and ``bias`` do not fit.
        """
        check_factors(U, V, bias)
        layer = cls(
            V.shape[0], U.shape[0], U.shape[1], bias=bias is not None,
            device=U.device, dtype=U.dtype, dense_fallback=False,
        )
        with torch.no_grad():
            layer.U.copy_(U)
            layer.V.copy_(V)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int | None, whitening: torch.Tensor | None = None
    ) -> "LowRankLinear":
        """Factorize ``linear`` at ``rank``; dense mode when ``rank`` is None or past break-even.

        Args:
            linear: the layer to replace (its device and dtype are kept).
            rank: target rank ``k``, or None to keep the dense weight.
            whitening: optional Gram matrix ``XᵀX`` ``[in_features, in_features]`` of the layer's
                calibration inputs; given, the factorization minimizes ``‖(W − UVᵀ)X‖`` (SVD-LLM's
                truncation-aware whitening) instead of ``‖W − UVᵀ‖``.
        """
        weight, bias = linear.weight, linear.bias
        m, n = weight.shape
        if rank is None or use_dense(m, n, rank):
            layer = cls(n, m, None, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
            return layer
        if whitening is None:
            spectrum = plain_svd(weight, max_rank=rank)
        else:
            spectrum = whitened_svd(weight, whitening, max_rank=rank)
        U, V = spectrum.factors(rank)
        return cls.from_factors(
            U.to(weight.device, weight.dtype), V.to(weight.device, weight.dtype), bias
        )

    def dense_weight(self) -> torch.Tensor:
        """The ``[out_features, in_features]`` weight this layer applies (``U @ V.T`` when low-rank)."""
        return self.weight if self.is_dense else self.U @ self.V.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_dense:
            return F.linear(x, self.weight, self.bias)
        return lowrank_linear(x, self.U, self.V, self.bias)

    def extra_repr(self) -> str:
        rank = "dense" if self.is_dense else self.rank
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={rank}, bias={self.bias is not None}"
