"""Budget machinery shared by the allocators: check spectra, hit a ``keep`` target exactly.

An allocator proposes ranks (from a closed form, or from training); :func:`fit_budget` then
rounds them to the allowed ranks and moves single steps between layers until the plan uses the
budget ``keep·Σ m·n`` as fully as it can without exceeding it. Each layer's allowed ranks form a
*ladder* ``[q, 2q, …, top, dense]`` (``q`` = ``multiple_of``, ``top`` = the largest allowed rank
below break-even); a step is one rung. Steps are chosen greedily by value gained (or lost) per
parameter, where the caller says what a rank is worth to a layer.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Mapping

import numpy as np
import torch

from lowrank_infer.allocation.plan import PlanError
from lowrank_infer.cost import layer_params, max_useful_rank
from lowrank_infer.factorize import Spectrum

__all__ = ["captured_energy", "fit_budget", "layer_type", "spectra_shapes"]

# Every allocator's contract: keep_achieved is within this (absolute) distance of keep_target.
KEEP_TOLERANCE = 0.005


def layer_type(name: str) -> str:
    """The matrix type of a target linear: the last component of its name (``q_proj``, ``down_proj``)."""
    return name.rsplit(".", 1)[-1]


def spectra_shapes(spectra: Mapping[str, Spectrum]) -> dict[str, tuple[int, int]]:
    """Name → ``(out_features, in_features)``, after checking that every spectrum is usable.

    Raises:
        ValueError: no spectra, a layer whose spectrum is missing (``None``) or not a
            :class:`Spectrum`, or singular values that are NaN, infinite or negative.
    """
    if not spectra:
        raise ValueError("rank allocation needs one Spectrum per target linear, got none")
    shapes = {}
    for name, spectrum in spectra.items():
        if spectrum is None:
            raise ValueError(f"the spectrum of layer {name!r} is missing")
        if not isinstance(spectrum, Spectrum):
            raise ValueError(f"layer {name!r}: expected a Spectrum, got {type(spectrum).__name__}")
        sigma = spectrum.sigma
        if sigma.numel() == 0 or not torch.isfinite(sigma).all() or (sigma < 0).any():
            raise ValueError(f"layer {name!r}: its singular values are empty or contain NaN, Inf or negative values")
        shapes[name] = (spectrum.out_features, spectrum.in_features)
    return shapes


def captured_energy(sigma: torch.Tensor) -> list[float]:
    """``e[k]`` = share of ``Σσ²`` kept by the first ``k`` directions, for ``k = 0..len(σ)``."""
    sigma = sigma.to(torch.float64)
    top = float(sigma.abs().max()) if sigma.numel() else 0.0
    energy = (sigma / top).square() if top > 0 else sigma.square()  # scaled: σ² may overflow float64
    total = float(energy.sum())
    cumulative = torch.cat([energy.new_zeros(1), energy.cumsum(0)])
    return (cumulative / total).tolist() if total > 0 else [1.0] * (sigma.numel() + 1)


def _ladder(out_f: int, in_f: int, cap: int | None, multiple_of: int) -> list[int | None]:
    """Allowed ranks of one layer, cheapest first, ending with dense (``None``).

    A layer too small to hold even one multiple of ``multiple_of`` below break-even can only
    stay dense.
    """
    top = max_useful_rank(out_f, in_f)
    if cap is not None:
        top = min(top, cap)
    return list(range(multiple_of, top + 1, multiple_of)) + [None]


def _snap(ladder: list[int | None], rank: int | None) -> int:
    """Index of the rung nearest to ``rank``; ranks past the top rung (or ``None``) are dense."""
    if rank is None or len(ladder) == 1 or rank > ladder[-2]:
        return len(ladder) - 1
    return min(range(len(ladder) - 1), key=lambda i: (abs(ladder[i] - rank), i))


class _Layer:
    """One layer's ladder and its current rung."""

    def __init__(self, name: str, shape: tuple[int, int], ladder: list[int | None], rung: int, value):
        self.name = name
        self.shape = shape
        self.ladder = ladder
        self.rung = rung
        self._value = value

    @property
    def rank(self) -> int | None:
        return self.ladder[self.rung]

    def cost(self, rung: int) -> int:
        return layer_params(*self.shape, self.ladder[rung])

    def value(self, rung: int) -> float:
        return self._value(self.name, self.ladder[rung])

    def step(self, rung: int) -> tuple[int, float]:
        """Parameters and value that going from ``rung`` to ``rung + 1`` adds."""
        return self.cost(rung + 1) - self.cost(rung), self.value(rung + 1) - self.value(rung)

    def up_ratio(self) -> float:
        """Value gained per parameter by one rung up (negated: the heap is a min-heap)."""
        params, gained = self.step(self.rung)
        return -gained / params

    def down_ratio(self) -> float:
        """Value lost per parameter freed by one rung down."""
        params, lost = self.step(self.rung - 1)
        return lost / params


def fit_budget(
    shapes: Mapping[str, tuple[int, int]],
    ranks: Mapping[str, int | None],
    keep: float,
    value: Callable[[str, int | None], float],
    *,
    caps: Mapping[str, int] | None = None,
    multiple_of: int = 1,
) -> dict[str, int | None]:
    """Snap ``ranks`` to the allowed ranks, then repair them to the budget ``keep·Σ m·n``.

    First, while the plan is over budget, the rung whose loss per freed parameter is smallest is
    given up; then, while any single rung up still fits, the one with the largest gain per
    parameter is taken. Should coarse rungs still leave more slack than the tolerance, rungs are
    traded (one down, another up) to fill it, and if trades stall, a knapsack over every
    layer's rungs finds the most valuable plan within the tolerance. The result never exceeds
    the budget.

    Args:
        shapes: name → ``(out_features, in_features)``.
        ranks: name → proposed rank (``None`` = dense).
        keep: target fraction of parameters kept, in (0, 1].
        value: ``(name, rank) -> float``, what the layer is worth at that rank (``None`` = dense);
            must not decrease with the rank.
        caps: name → largest low-rank rank allowed (e.g. how many factors a spectrum stores).
        multiple_of: low-rank ranks are multiples of this.

    Returns:
        name → rank (``None`` = dense), every rank ``>= 1``.

    Raises:
        PlanError: ``multiple_of < 1``, a budget below the smallest plan possible, or rungs too
            coarse to come within :data:`KEEP_TOLERANCE` of it.
    """
    if multiple_of < 1:
        raise PlanError(f"multiple_of must be >= 1, got {multiple_of}")
    layers = []
    for name, shape in shapes.items():
        ladder = _ladder(*shape, None if caps is None else caps[name], multiple_of)
        layers.append(_Layer(name, shape, ladder, _snap(ladder, ranks[name]), value))
    dense = sum(m * n for m, n in shapes.values())
    budget = keep * dense
    smallest = sum(layer.cost(0) for layer in layers)
    if smallest > budget:
        raise PlanError(
            f"keep {keep:g} is below the smallest plan possible, {smallest / dense:.4g} "
            f"(every layer at its lowest rank with multiple_of={multiple_of})"
        )
    total = _shrink_to(layers, sum(layer.cost(layer.rung) for layer in layers), budget)
    total = _grow_to(layers, total, budget)
    while (budget - total) / dense > KEEP_TOLERANCE and _trade_up(layers, budget - total):
        total = sum(layer.cost(layer.rung) for layer in layers)
    if (budget - total) / dense > KEEP_TOLERANCE and _fill_by_knapsack(layers, budget, KEEP_TOLERANCE * dense):
        total = sum(layer.cost(layer.rung) for layer in layers)
    if (budget - total) / dense > KEEP_TOLERANCE:
        raise PlanError(
            f"cannot get within {KEEP_TOLERANCE:g} of keep {keep:g} (reached {total / dense:.4g}): "
            f"the allowed ranks are too coarse for these layers; lower multiple_of ({multiple_of})"
        )
    return {layer.name: layer.rank for layer in layers}


def _shrink_to(layers: list[_Layer], total: int, budget: float) -> int:
    """Give up the cheapest-to-lose rungs until ``total <= budget``; return the new total."""
    heap = [(layer.down_ratio(), i) for i, layer in enumerate(layers) if layer.rung > 0]
    heapq.heapify(heap)
    while total > budget:  # fit_budget checked that the lowest rungs fit, so the heap lasts
        _, i = heapq.heappop(heap)
        layer = layers[i]
        total -= layer.step(layer.rung - 1)[0]
        layer.rung -= 1
        if layer.rung > 0:
            heapq.heappush(heap, (layer.down_ratio(), i))
    return total


def _grow_to(layers: list[_Layer], total: int, budget: float) -> int:
    """Take the best-value rungs that still fit under ``budget``; return the new total."""
    heap = [(layer.up_ratio(), i) for i, layer in enumerate(layers) if layer.rung < len(layer.ladder) - 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        layer = layers[i]
        step, _ = layer.step(layer.rung)
        if total + step > budget:
            continue  # the budget left only shrinks, so this rung never fits again
        total += step
        layer.rung += 1
        if layer.rung < len(layer.ladder) - 1:
            heapq.heappush(heap, (layer.up_ratio(), i))
    return total


def _trade_up(layers: list[_Layer], slack: float) -> bool:
    """One rung down on a layer and one up on another, adding parameters within ``slack``.

    Only used when coarse rungs (large ``multiple_of``, tiny layers) leave more slack than the
    tolerance; of the trades that fit, the one losing the least value is made.
    """
    downs = [(layer.step(layer.rung - 1), i) for i, layer in enumerate(layers) if layer.rung > 0]
    ups = [(layer.step(layer.rung), j) for j, layer in enumerate(layers) if layer.rung < len(layer.ladder) - 1]
    trades = [
        (lost - gained, i, j)
        for (freed, lost), i in downs
        for (cost, gained), j in ups
        if i != j and 0 < cost - freed <= slack
    ]
    if not trades:
        return False
    _, i, j = min(trades)
    layers[i].rung -= 1
    layers[j].rung += 1
    return True


# Budgets up to this many parameters get an exact knapsack (one bucket per parameter); larger
# ones use buckets whose rounding costs at most a quarter of the tolerance.
_EXACT_BUDGET = 2_000_000
_BUCKETS_PER_LAYER = 4


def _fill_by_knapsack(layers: list[_Layer], budget: float, tolerance: float) -> bool:
    """Set every layer's rung to the most valuable plan costing within ``[budget - tolerance,
    budget]``, by dynamic programming over costs; False (rungs unchanged) if none is found.

    Only reached when greedy steps and pairwise trades leave too much slack: coarse ladders on
    small layers, so the tables stay small (layers × rungs × buckets).
    """
    exact = budget <= _EXACT_BUDGET
    unit = 1.0 if exact else tolerance / (_BUCKETS_PER_LAYER * len(layers))
    size = int(budget // unit) + 1
    best = np.full(size, -np.inf)
    best[0] = 0.0
    choices = []
    for layer in layers:
        # Costs rounded up to whole buckets: a plan that fits in buckets fits the budget.
        costs = [math.ceil(layer.cost(r) / unit) for r in range(len(layer.ladder))]
        new, choice = np.full(size, -np.inf), np.full(size, -1, dtype=np.int32)
        for rung, cost in enumerate(costs):
            if cost >= size:
                continue
            shifted = np.full(size, -np.inf)
            shifted[cost:] = best[: size - cost] + layer.value(rung)
            better = shifted > new
            new[better], choice[better] = shifted[better], rung
        best = new
        choices.append((choice, costs))
    # Rounding up added under one bucket per layer: from here on, buckets certainly reach the floor.
    floor = max(0, math.ceil((budget - tolerance) / unit) + (0 if exact else len(layers)))
    if floor >= size or not np.isfinite(best[floor:]).any():
        return False
    bucket = floor + int(np.argmax(best[floor:]))
    for layer, (choice, costs) in zip(reversed(layers), reversed(choices)):
        layer.rung = int(choice[bucket])
        bucket -= costs[layer.rung]
    return True
