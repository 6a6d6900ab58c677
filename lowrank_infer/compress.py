"""One in-place entry point: calibrate, factorize, allocate ranks, swap modules."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_infer.allocation import METHODS, AllocationInputs, MethodConfig, RankPlan, UniformConfig
from lowrank_infer.calibration import calibrate
from lowrank_infer.compensation import compensated_factors
from lowrank_infer.evaluate import mean_nll
from lowrank_infer.factorize import Spectrum, plain_svd, whitened_svd
from lowrank_infer.io import attach_plan
from lowrank_infer.structure import target_linears
from lowrank_infer.surgery import apply_plan, check_uncompressed, plan_applied

__all__ = ["CompressResult", "analyze", "compress", "compute_spectra", "config_for", "needs_calibration"]

# Calibration windows on which candidate plans are scored (D-Rank's beta="auto").
SCORE_WINDOWS = 8


@dataclass
class CompressResult:
    """The plan that was applied and where the time went (seconds)."""

    plan: RankPlan
    seconds: dict[str, float]


def config_for(method: str, **settings) -> MethodConfig:
    """The config of ``method`` (a name in ``METHODS``) with ``settings`` applied.

    Raises:
        ValueError: an unknown method, or a setting the method does not take or of the wrong kind.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]().replace(**settings)


def needs_calibration(config: MethodConfig, plan: RankPlan | None = None) -> bool:
    """Whether compressing with ``config`` (applying ``plan``, when given) needs calibration ids:
    a plan needs them only for whitening or sequential refitting; otherwise the method says."""
    return config.whiten or config.sequential if plan is not None else config.needs_calibration


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


def _plan_loss(model: nn.Module, spectra: Mapping[str, Spectrum], ids: torch.Tensor) -> Callable[[RankPlan], float]:
    """``plan -> mean next-token loss`` of ``model`` with ``plan`` applied for the call."""

    def score(plan: RankPlan) -> float:
        training = model.training
        model.eval()
        try:
            with plan_applied(model, plan, lambda name, rank: spectra[name].factors(rank)):
                return mean_nll(model, ids)
        finally:
            model.train(training)

    return score


def _resolve(config: MethodConfig | None, plan: RankPlan | None) -> MethodConfig:
    """The config to run: ``config``, else the plan's method at the plan's keep, else uniform."""
    if plan is None:
        return config or UniformConfig()
    if config is None:
        return METHODS.get(plan.method, MethodConfig)(keep=plan.keep_target)
    config.check_plan(plan)
    return config


def _check_inputs(model, config: MethodConfig, plan: RankPlan | None, calib_ids, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_uncompressed(model)
    if needs_calibration(config, plan) and calib_ids is None:
        raise ValueError(f"{config.name} with whiten={config.whiten}, sequential={config.sequential} "
                         "needs calibration data (calib_ids)")


def analyze(
    model: nn.Module,
    config: MethodConfig | None = None,
    *,
    calib_ids: torch.Tensor | None = None,
    plan: RankPlan | None = None,
    model_id: str = "",
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[RankPlan, dict[str, Spectrum], dict[str, float]]:
    """Calibrate, factorize and allocate without changing the model (arguments as :func:`compress`).

    Returns:
        ``(plan, spectra, seconds)``: the plan (``plan`` itself when given), each target
        linear's spectrum, and the time per stage.
    """
    config = _resolve(config, plan)
    _check_inputs(model, config, plan, calib_ids, batch_size)
    return _analyze(model, config, calib_ids, plan, model_id, batch_size, device, progress)


def _analyze(model, config, calib_ids, plan, model_id, batch_size, device, progress):
    """:func:`analyze` once its inputs are checked."""
    linears = target_linears(model, include=config.include, exclude=config.exclude)
    if plan is not None:
        plan.validate({name: (m.out_features, m.in_features) for name, m in linears.items()})
        linears = {name: linears[name] for name in plan.ranks}  # a plan names the layers it changes
    seconds = {}
    grams = None
    if config.whiten:
        start = time.perf_counter()
        grams = calibrate(model, calib_ids, linears, batch_size=batch_size, device=device, progress=progress)
        seconds["calibration"] = time.perf_counter() - start
    start = time.perf_counter()
    caps = {name: (plan[name].rank or 1) if plan is not None else config.factor_cap(m.out_features, m.in_features)
            for name, m in linears.items()}
    spectra = compute_spectra(linears, grams, caps=caps, device=device, progress=progress)
    seconds["factorization"] = time.perf_counter() - start
    if plan is None:
        start = time.perf_counter()
        score = None if calib_ids is None else _plan_loss(model, spectra, calib_ids[:SCORE_WINDOWS])
        inputs = AllocationInputs(spectra, model_id=model_id, model=model, calib_ids=calib_ids, score=score,
                                  progress=progress)
        plan = config.allocate(inputs)
        plan.params["whiten"] = config.whiten
        seconds["allocation"] = time.perf_counter() - start
    return plan, spectra, seconds


def compress(
    model: nn.Module,
    config: MethodConfig | None = None,
    *,
    calib_ids: torch.Tensor | None = None,
    plan: RankPlan | None = None,
    model_id: str = "",
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CompressResult:
    """Compress ``model`` in place: its target linears become ``LowRankLinear`` per a rank plan.

    Args:
        model: a Hugging Face decoder-only causal LM (dense).
        config: the method and its settings, e.g. ``DRankConfig(keep=0.8)`` (default:
            ``UniformConfig()``, or the plan's method when ``plan`` is given).
        calib_ids: ``[samples, seq_len]`` calibration token ids (needed when
            ``config.needs_calibration``, or with a plan for whitening).
        plan: apply this plan instead of allocating; a ``config`` given with it must agree
            with it (method, keep, hyper-parameters).
        model_id: recorded in the plan.
        batch_size: calibration samples per forward pass.
        device: where calibration and SVD run (default: where the model is).
        progress: show progress bars.

    Returns:
        The applied plan (also attached to ``model.config``) and per-stage timings.

    Raises:
        ValueError: missing calibration data, a plan that contradicts the config or does not
            fit the model, an already compressed model.
    """
    config = _resolve(config, plan)
    _check_inputs(model, config, plan, calib_ids, batch_size)
    seconds = {}
    if plan is None or not config.sequential:  # a given plan needs no spectra when refitted
        plan, spectra, seconds = _analyze(model, config, calib_ids, plan, model_id, batch_size, device, progress)
    if config.sequential:
        start = time.perf_counter()
        refitted = compensated_factors(model, plan, calib_ids, ridge=config.ridge, batch_size=batch_size,
                                       device=device, progress=progress)
        seconds["compensation"] = time.perf_counter() - start
        # A new plan object: a plan the caller passed in stays as it was.
        plan = dataclasses.replace(plan, params={**plan.params, "sequential": True, "ridge": config.ridge})
        apply_plan(model, plan, lambda name, rank: refitted[name])
    else:
        apply_plan(model, plan, lambda name, rank: spectra[name].factors(rank))
    attach_plan(model, plan)
    return CompressResult(plan=plan, seconds=seconds)
