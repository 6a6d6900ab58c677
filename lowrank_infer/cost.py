"""What a layer costs in parameters: the one rule every allocator, report and kernel shares."""

from __future__ import annotations

__all__ = ["layer_params", "max_useful_rank", "use_dense"]


def layer_params(out_features: int, in_features: int, rank: int | None) -> int:
    """Parameters a layer keeps: ``m·n`` when dense (``rank is None``), else ``k·(m+n)``."""
    if rank is None:
        return out_features * in_features
    return rank * (out_features + in_features)


def use_dense(m: int, n: int, k: int) -> bool:
    """True when a rank-``k`` factorization of an ``m×n`` weight is not smaller than the weight."""
    return layer_params(m, n, k) >= layer_params(m, n, None)


def max_useful_rank(out_features: int, in_features: int) -> int:
    """Largest rank that is still cheaper than the dense layer (the last ``k`` with ``not use_dense``)."""
    return max(0, (out_features * in_features - 1) // (out_features + in_features))
