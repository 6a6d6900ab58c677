"""Method configs: one small frozen dataclass per allocation method, validated when it is made.

A config says everything a method needs to know (the keep ratio, its hyper-parameters) and
declares what the pipeline must hand it: calibration data (``needs_calibration``), how many
factors of each layer to keep (``factor_cap``). ``allocate`` turns an :class:`AllocationInputs`
into a :class:`RankPlan`. The pipeline finds a method's config class by name in
``lowrank_infer.allocation.METHODS``; adding a method is one module plus one line there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

from lowrank_infer.allocation.plan import RankPlan, check_keep
from lowrank_infer.cost import max_useful_rank
from lowrank_infer.distributed import Ranks
from lowrank_infer.factorize import Spectrum
from lowrank_infer.precision import check_compute_dtype

__all__ = ["AllocationInputs", "MethodConfig"]


@dataclass(frozen=True)
class AllocationInputs:
    """What the pipeline hands an allocator.

    Attributes:
        spectra: name → :class:`Spectrum` of every target linear, factors kept up to the
            config's ``factor_cap``; plan order is this order.
        model_id: recorded in the plan.
        model: the dense model the spectra came from (for methods that train on it).
        calib_ids: ``[samples, seq_len]`` calibration token ids, when the pipeline has them.
        score: ``plan -> loss`` of the model with ``plan`` applied (lower is better), for
            methods that choose between candidate plans; None without calibration data.
        progress: show progress bars.
        ranks: the process group the allocator runs in; only methods with ``data_parallel``
            are called on ranks other than 0 (each trains on its share of ``calib_ids``).
    """

    spectra: Mapping[str, Spectrum]
    model_id: str = ""
    model: nn.Module | None = None
    calib_ids: torch.Tensor | None = None
    score: Callable[[RankPlan], float] | None = None
    progress: bool = True
    ranks: Ranks = Ranks()

    def lowest_loss(self, candidates: Iterable[tuple[Any, RankPlan]], method: str, key: str) -> RankPlan:
        """The candidate plan that ``score`` rates lowest; ``candidates`` yields ``(value of key,
        plan)`` (lazily: each plan is made only when its turn comes). The winner's params record
        every candidate value and loss under ``{key}_selection``.

        Raises:
            ValueError: a loss is not finite (naming ``method`` and ``key=value``).
        """
        scored = []
        for label, plan in candidates:
            loss = self.score(plan)
            if not math.isfinite(loss):
                raise ValueError(f"{method} {key}={label}: calibration loss is {loss}")
            scored.append((loss, label, plan))
        _, _, best = min(scored, key=lambda item: item[0])
        best.params[f"{key}_selection"] = {"candidates": [label for _, label, _ in scored],
                                           "calibration_loss": [round(loss, 6) for loss, _, _ in scored]}
        return best


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class MethodConfig:
    """What every method shares: the budget, rank granularity, whitening and layer selection.

    Attributes:
        keep: fraction of target-linear parameters kept, in (0, 1].
        multiple_of: low-rank ranks are multiples of this (16 keeps GPU GEMMs on their aligned
            fast paths; 1 = exact ranks).
        whiten: truncation-aware whitened SVD (needs calibration data); False = plain SVD.
        shrinkage: before whitening, pull each layer's input Gram toward a scaled identity by
            this fraction, in [0, 1) (0 = the calibration statistics as they are): less trust
            in the directions the calibration text leaves quiet. Whether other text gains depends
            on the ranks (on SmolLM2 it helped ARA's factors and hurt uniform ranks';
            ``benchmarks/results/quality_smollm2_findings.md``).
            ``"auto"``: each layer's strength chosen by two-fold cross-validation over the
            calibration windows, at the rank a uniform plan (or the applied plan) gives it.
        include: regexes; when given, only target linears matching one of them are compressed.
        exclude: regexes; target linears matching any of them stay as they are.
        sequential: once the plan is made, refit each layer's factors block by block on the
            inputs the compressed model feeds it (needs calibration data); False = the factors
            of each layer's own whitened SVD.
        ridge: with ``sequential``, the pull toward the dense weight (relative to the median
            input energy).
        refine_steps: most Adam steps of each block's factors toward the dense block's outputs on
            the compressed stream, block by block, stopped on held-out windows; the factors start
            from the closed form with ``sequential``, else from each layer's whitened SVD
            (0 = no refinement).
        refine_lr: Adam's learning rate of ``refine_steps``, relative to each factor's scale (a
            tensor trains at ``refine_lr`` times its RMS).
        compute_dtype: dtype of the forward passes that train (ARA's masks, refinement):
            ``"bfloat16"`` runs them under autocast, 1.2-1.8x faster where the hardware has
            native bfloat16 matmuls (:mod:`lowrank_infer.precision`); calibration statistics,
            closed forms and factorizations stay float64 either way.
    """

    keep: float = 0.8
    multiple_of: int = 1
    whiten: bool = True
    shrinkage: float | str = 0.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    sequential: bool = False
    ridge: float = 1e-2
    refine_steps: int = 0
    refine_lr: float = 3e-3
    compute_dtype: str = "float32"

    name: ClassVar[str] = "plan"
    # Methods that train on the model run on every rank of a process group, each on its share of
    # the calibration windows; the others run on rank 0 alone.
    data_parallel: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", check_keep(self.keep))
        if not _is_int(self.multiple_of) or self.multiple_of < 1:
            raise ValueError(f"multiple_of must be an integer >= 1, got {self.multiple_of!r}")
        for key in ("whiten", "sequential"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}")
        if self.shrinkage != "auto" and not (_is_number(self.shrinkage) and 0 <= self.shrinkage < 1):
            raise ValueError(f"shrinkage must be a number in [0, 1) or 'auto', got {self.shrinkage!r}")
        if self.shrinkage and not self.whiten:
            raise ValueError("shrinkage applies to whitening; it means nothing with whiten=False")
        if self.shrinkage != "auto":
            object.__setattr__(self, "shrinkage", float(self.shrinkage))
        if not (_is_number(self.ridge) and self.ridge > 0):
            raise ValueError(f"ridge must be a positive number, got {self.ridge!r}")
        if not _is_int(self.refine_steps) or self.refine_steps < 0:
            raise ValueError(f"refine_steps must be an integer >= 0, got {self.refine_steps!r}")
        if not (_is_number(self.refine_lr) and self.refine_lr > 0):
            raise ValueError(f"refine_lr must be a positive number, got {self.refine_lr!r}")
        check_compute_dtype(self.compute_dtype)
        for key in ("include", "exclude"):
            object.__setattr__(self, key, tuple(getattr(self, key) or ()))
        for field in self._hyperparameter_fields():
            self._check_kind(field.name, getattr(self, field.name), field.default)

    @classmethod
    def _hyperparameter_fields(cls) -> list[dataclasses.Field]:
        shared = {field.name for field in dataclasses.fields(MethodConfig)}
        return [field for field in dataclasses.fields(cls) if field.name not in shared]

    def _check_kind(self, name: str, value: Any, default: Any) -> None:
        """A hyper-parameter must be like its default: an int for an int, a number for a float
        (stored as float), a non-empty list of numbers for a tuple."""
        if isinstance(default, float) and _is_number(value):
            object.__setattr__(self, name, float(value))
        elif isinstance(default, tuple) and isinstance(value, (list, tuple)) and value and all(map(_is_number, value)):
            object.__setattr__(self, name, tuple(float(v) for v in value))
        elif not (_is_int(default) and _is_int(value)) and not isinstance(default, (str, type(None))):
            raise ValueError(f"{self.name}: {name}={value!r} should be like its default {default!r}")

    def hyperparameters(self) -> dict[str, Any]:
        """The method's own settings (not the shared ones), as recorded in its plans."""
        return {field.name: getattr(self, field.name) for field in self._hyperparameter_fields()}

    def replace(self, **changes: Any) -> "MethodConfig":
        """A copy with ``changes`` (``dataclasses.replace``); an unknown name is a ``ValueError``
        that lists the names this method takes."""
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            own = ", ".join(field.name for field in self._hyperparameter_fields()) or "none"
            raise ValueError(f"method {self.name!r} takes no parameter {unknown[0]!r} (its parameters: {own})")
        return dataclasses.replace(self, **changes)

    @property
    def needs_calibration(self) -> bool:
        """Whether the pipeline must have calibration token ids for this config."""
        return self.whiten or self.sequential or self.refine_steps > 0

    @property
    def needs_model_forward(self) -> bool:
        """Whether allocating runs the whole model (training on it, or scoring plans with it)."""
        return False

    def factor_cap(self, out_features: int, in_features: int) -> int:
        """How many factors of an ``out×in`` layer the allocator may use (default: up to break-even)."""
        return max(1, max_useful_rank(out_features, in_features))

    def allocate(self, inputs: AllocationInputs) -> RankPlan:
        """The plan this method makes (methods override this; the base config only applies plans)."""
        raise ValueError("this config only applies a given rank plan; choose a method (uniform, drank, ara)")

    def check_plan(self, plan: RankPlan) -> None:
        """Refuse a plan that contradicts this config (another method, keep or hyper-parameter).

        The base config (``name = "plan"``) accepts any plan.
        """
        if self.name == MethodConfig.name:
            return
        if plan.method != self.name:
            raise ValueError(f"method {self.name} disagrees with the plan's method {plan.method!r}")
        if abs(plan.keep_target - self.keep) > 1e-9:
            raise ValueError(f"keep {self.keep} disagrees with the plan's keep {plan.keep_target}")
        for field in self._hyperparameter_fields():
            value = getattr(self, field.name)
            if value != field.default and plan.params.get(field.name) != value:
                raise ValueError(f"{self.name}: {field.name}={value!r} has no effect with a plan "
                                 f"(the plan was made with {plan.params.get(field.name)!r})")
