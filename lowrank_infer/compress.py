"""One in-place entry point: calibrate, factorize, allocate ranks, swap modules."""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_infer.allocation import RankPlan, check_keep, max_useful_rank, uniform_plan
from lowrank_infer.calibration import calibrate
from lowrank_infer.factorize import Spectrum, plain_svd, whitened_svd
from lowrank_infer.io import attach_plan
from lowrank_infer.surgery import apply_plan, target_linears

__all__ = [
    "METHODS", "CompressConfig", "CompressResult", "analyze", "check_method_params", "compress", "compute_spectra",
    "make_plan",
]

METHODS = ("uniform", "drank", "ara")
# ARA factorizes each layer past break-even (keep 1.2) so that "dense" stays reachable.
ARA_RANK_HEADROOM = 1.2


@dataclass
class CompressConfig:
    """What to compress and how.

    Attributes:
        keep: fraction of target-linear parameters kept, in (0, 1].
        method: rank allocation, one of ``uniform``, ``drank``, ``ara`` (ignored with a plan).
        whiten: truncation-aware whitened SVD (needs calibration data); False = plain SVD.
        include / exclude: regexes selecting target linears by qualified name.
        multiple_of: low-rank ranks are multiples of this (16 keeps GPU GEMMs on their fast,
            aligned paths; 1 = the allocators' exact ranks).
        batch_size: calibration samples per forward pass.
        device: where calibration and SVD run (default: the model's device).
        method_params: keyword arguments for the allocation method.
    """

    keep: float = 0.8
    method: str = "uniform"
    whiten: bool = True
    include: list[str] | None = None
    exclude: list[str] | None = None
    multiple_of: int = 1
    batch_size: int = 8
    device: str | None = None
    method_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep = check_keep(self.keep)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {self.multiple_of}")
        check_method_params(self.method, self.method_params)


# Set by the pipeline itself, never by method_params.
_PIPELINE_ARGUMENTS = {"model_id", "progress", "multiple_of"}


def _allocator(method: str, params: Mapping[str, Any]):
    """The function ``make_plan`` will call for ``method`` with these parameters."""
    from lowrank_infer.allocation import ara_plan, drank_auto_plan, drank_plan

    if method == "ara":
        return ara_plan
    if method == "drank":
        return drank_auto_plan if params.get("beta", "auto") == "auto" else drank_plan
    return None


def check_method_params(method: str, params: Mapping[str, Any]) -> None:
    """Names and types of ``params`` against the keyword arguments of ``method``'s allocator,
    so that a typo fails before calibration, not after it.

    Raises:
        ValueError: an unknown name (listing the known ones) or a value of the wrong type.
    """
    allocator = _allocator(method, params)
    known = {} if allocator is None else {
        name: arg.default for name, arg in inspect.signature(allocator).parameters.items()
        if arg.kind is inspect.Parameter.KEYWORD_ONLY and name not in _PIPELINE_ARGUMENTS}
    if method == "drank":
        known.setdefault("beta", "auto")
    for name, value in params.items():
        if name not in known:
            raise ValueError(f"method {method!r} takes no parameter {name!r} "
                             f"(it takes: {', '.join(sorted(known)) or 'none'})")
        if not _same_kind(value, known[name]):
            raise ValueError(f"method {method!r}: parameter {name}={value!r} should be like its default {known[name]!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _same_kind(value: Any, default: Any) -> bool:
    """Whether ``value`` may stand where ``default`` does (an int for an int, any number for a float)."""
    if default == "auto":  # D-Rank's beta: "auto" or a number
        return value == "auto" or _is_number(value)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return _is_number(value)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(value) > 0 and all(map(_is_number, value))
    return True


@dataclass
class CompressResult:
    """The plan that was applied and where the time went (seconds)."""

    plan: RankPlan
    seconds: dict[str, float]


def _rank_cap(m: int, n: int, method: str, plan: RankPlan | None, name: str) -> int:
    if plan is not None:
        return plan[name].rank or 1
    if method == "ara":
        return min(m, n, math.ceil(ARA_RANK_HEADROOM * m * n / (m + n)))
    return max(1, max_useful_rank(m, n))


def compute_spectra(
    linears: Mapping[str, nn.Linear],
    grams: Mapping[str, torch.Tensor] | None,
    *,
    caps: Mapping[str, int],
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Spectrum]:
    """Whitened (``grams`` given) or plain SVD of each linear, factors kept up to ``caps[name]``."""
    spectra = {}
    for name, linear in tqdm(linears.items(), desc="factorize", unit="layer", disable=not progress):
        weight = linear.weight.to(device) if device is not None else linear.weight
        if grams is None:
            spectra[name] = plain_svd(weight, max_rank=caps[name], name=name)
        else:
            spectra[name] = whitened_svd(weight, grams[name].to(weight.device), max_rank=caps[name], name=name)
    return spectra


def make_plan(
    method: str,
    keep: float,
    *,
    shapes: Mapping[str, tuple[int, int]],
    spectra: Mapping[str, Spectrum] | None = None,
    model: nn.Module | None = None,
    calib_ids: torch.Tensor | None = None,
    model_id: str = "",
    params: Mapping[str, Any] | None = None,
    multiple_of: int = 1,
    progress: bool = True,
) -> RankPlan:
    """Run one allocation method (see :data:`METHODS`)."""
    params = {"multiple_of": multiple_of, **(params or {})}
    if method == "uniform":
        return uniform_plan(shapes, keep, model=model_id, multiple_of=params["multiple_of"])
    if spectra is None:
        raise ValueError(f"method {method!r} needs per-layer spectra")
    if method == "drank":
        return _drank(spectra, keep, model=model, calib_ids=calib_ids, model_id=model_id, params=params, progress=progress)
    if method == "ara":
        from lowrank_infer.allocation import ara_plan

        if model is None or calib_ids is None:
            raise ValueError("method 'ara' needs the model and calibration token ids")
        return ara_plan(model, spectra, calib_ids, keep, model_id=model_id, progress=progress, **params)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _drank(spectra, keep, *, model, calib_ids, model_id, params, progress) -> RankPlan:
    """D-Rank; ``beta="auto"`` (the default) picks β on calibration data when it is at hand."""
    from lowrank_infer.allocation import drank_auto_plan, drank_plan

    params = dict(params)
    beta = params.pop("beta", "auto")
    if beta != "auto":
        return drank_plan(spectra, keep, model_id=model_id, beta=beta, **params)
    if model is None or calib_ids is None:
        return drank_plan(spectra, keep, model_id=model_id, **params)  # the paper's fixed β
    return drank_auto_plan(model, spectra, calib_ids, keep, model_id=model_id, progress=progress, **params)


def analyze(
    model: nn.Module,
    config: CompressConfig,
    *,
    calib_ids: torch.Tensor | None = None,
    plan: RankPlan | None = None,
    model_id: str = "",
    progress: bool = True,
) -> tuple[RankPlan, dict[str, Spectrum], dict[str, float]]:
    """Calibrate, factorize and allocate without changing the model (arguments as :func:`compress`).

    Returns:
        ``(plan, spectra, seconds)``: the plan (``plan`` itself when given), each target
        linear's spectrum, and the time per stage.
    """
    seconds = {}
    linears = target_linears(model, include=config.include, exclude=config.exclude)
    shapes = {name: (m.out_features, m.in_features) for name, m in linears.items()}
    if plan is not None:
        plan.validate(shapes)
        # A plan names the layers it changes (one made with --include lists only those).
        linears = {name: linears[name] for name in plan.ranks}
        shapes = {name: shapes[name] for name in plan.ranks}
    needs_data = config.whiten or (plan is None and config.method == "ara")
    if needs_data and calib_ids is None:
        raise ValueError("whitened SVD and ARA need calibration data (calib_ids); or set whiten=False")
    grams = None
    if config.whiten:
        start = time.perf_counter()
        grams = calibrate(model, calib_ids, linears, batch_size=config.batch_size, device=config.device, progress=progress)
        seconds["calibration"] = time.perf_counter() - start
    start = time.perf_counter()
    caps = {name: _rank_cap(m, n, config.method, plan, name) for name, (m, n) in shapes.items()}
    spectra = compute_spectra(linears, grams, caps=caps, device=config.device, progress=progress)
    seconds["factorization"] = time.perf_counter() - start
    if plan is None:
        start = time.perf_counter()
        plan = make_plan(
            config.method, config.keep, shapes=shapes, spectra=spectra, model=model, calib_ids=calib_ids,
            model_id=model_id, params=config.method_params, multiple_of=config.multiple_of, progress=progress,
        )
        plan.params["whiten"] = config.whiten
        seconds["allocation"] = time.perf_counter() - start
    return plan, spectra, seconds


def compress(
    model: nn.Module,
    config: CompressConfig,
    *,
    calib_ids: torch.Tensor | None = None,
    plan: RankPlan | None = None,
    model_id: str = "",
    progress: bool = True,
) -> CompressResult:
    """Compress ``model`` in place: its target linears become ``LowRankLinear`` per a rank plan.

    Args:
        model: a Hugging Face decoder-only causal LM.
        config: keep ratio, method, whitening, layer selection.
        calib_ids: ``[samples, seq_len]`` calibration token ids (needed for whitening and ARA).
        plan: apply this plan instead of running an allocation method.
        model_id: recorded in the plan.
        progress: show progress bars.

    Returns:
        The applied plan (also attached to ``model.config``) and per-stage timings.
    """
    plan, spectra, seconds = analyze(
        model, config, calib_ids=calib_ids, plan=plan, model_id=model_id, progress=progress
    )
    apply_plan(model, plan, lambda name, rank: spectra[name].factors(rank))
    attach_plan(model, plan)
    return CompressResult(plan=plan, seconds=seconds)
