"""One in-place entry point: calibrate, factorize, allocate ranks, swap modules."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

import lowrank_infer.offload as offload
from lowrank_infer.allocation import METHODS, AllocationInputs, MethodConfig, RankPlan, UniformConfig, uniform_rank
from lowrank_infer.calibration import module_on
from lowrank_infer.compensation import Compensated, compensated_factors
from lowrank_infer.distributed import Ranks
from lowrank_infer.evaluate import mean_nll
from lowrank_infer.factorize import AUTO, Spectrum
from lowrank_infer.io import attach_plan
from lowrank_infer.refinement import RefineConfig
from lowrank_infer.spectra import spectra_everywhere, stream_spectra
from lowrank_infer.structure import target_linears
from lowrank_infer.surgery import apply_plan, check_uncompressed, plan_applied
from lowrank_infer.workdir import WorkDir

__all__ = ["CompressResult", "analyze", "compress", "config_for", "needs_calibration"]

# Calibration windows on which candidate plans are scored (D-Rank's beta="auto"), and held-out
# windows on which each block's refinement is scored.
SCORE_WINDOWS = 8
REFINE_HELD_WINDOWS = 8


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
    a plan needs them only for whitening, sequential refitting or refinement; otherwise the method says."""
    refitted = config.sequential or config.refine_steps > 0
    return config.whiten or refitted if plan is not None else config.needs_calibration


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


@dataclass(frozen=True)
class _Job:
    """One analysis or compression, its inputs resolved and checked."""

    model: nn.Module
    config: MethodConfig
    calib_ids: torch.Tensor | None
    plan: RankPlan | None
    model_id: str
    batch_size: int
    device: torch.device
    progress: bool
    work_dir: str | Path | None
    resume: bool
    ranks: Ranks
    select_ids: torch.Tensor | None = None


def _job(model, config, plan, calib_ids, batch_size, device, work_dir, resume, **rest) -> _Job:
    config = _resolve(config, plan)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_uncompressed(model)
    if needs_calibration(config, plan) and calib_ids is None:
        raise ValueError(f"{config.name} with whiten={config.whiten}, sequential={config.sequential} "
                         "needs calibration data (calib_ids)")
    if plan is not None and config.sequential and config.shrinkage:
        raise ValueError("shrinkage shapes the whitened SVD, which a plan refitted sequentially never uses "
                         "(the refit's own pull toward the dense weight is ridge)")
    if resume and work_dir is None:
        raise ValueError("resume needs the work directory of the run to continue (work_dir)")
    if offload.holds(model) and plan is None and config.needs_model_forward:
        raise ValueError(f"{config.name} with these settings runs the whole model, which weights kept on disk "
                         "never are: use uniform, D-Rank with a fixed beta, or a plan from 'lowrank-infer plan'")
    if config.refine_steps and rest.get("select_ids") is None:
        raise ValueError("refine_steps stops each block on held-out windows: pass select_ids (windows disjoint "
                         "from calib_ids)")
    ranks = Ranks.current()
    if ranks.world > 1 and (config.sequential or config.refine_steps):
        raise ValueError("sequential refitting and block refinement run in one process; start them without torchrun")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return _Job(model, config, calib_ids, plan, batch_size=batch_size, device=device, work_dir=work_dir,
                resume=resume, ranks=ranks, **rest)


def analyze(
    model: nn.Module,
    config: MethodConfig | None = None,
    *,
    calib_ids: torch.Tensor | None = None,
    plan: RankPlan | None = None,
    model_id: str = "",
    batch_size: int = 8,
    device: torch.device | str | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    select_ids: torch.Tensor | None = None,
) -> tuple[RankPlan, dict[str, Spectrum], dict[str, float]]:
    """Calibrate, factorize and allocate without changing the model (arguments as :func:`compress`).

    Returns:
        ``(plan, spectra, seconds)``: the plan (``plan`` itself when given), each target
        linear's spectrum (on rank 0; empty on the other ranks of a process group), and the
        time per stage.
    """
    job = _job(model, config, plan, calib_ids, batch_size, device, work_dir, resume, model_id=model_id,
               progress=progress, select_ids=select_ids)
    return _analyze(job)


def _run_settings(job: _Job, linears: Mapping[str, nn.Linear]) -> dict:
    """What makes two runs the same, for a work directory: a resume must match all of it."""
    digest = hashlib.sha256()
    if offload.holds(job.model):
        digest.update(offload.fingerprint(job.model).encode())
    else:
        for name, linear in linears.items():
            w = linear.weight.detach()
            sample = w.flatten()[:: max(1, w.numel() // 4096)].double().sum()  # a cheap fingerprint
            digest.update(f"{name}:{tuple(w.shape)}:{w.dtype}:{float(sample)!r};".encode())
    data = None if job.calib_ids is None else hashlib.sha256(job.calib_ids.cpu().numpy().tobytes()).hexdigest()
    return {
        "model_id": job.model_id, "weights": digest.hexdigest(), "calibration": data,
        "calibration_shape": None if job.calib_ids is None else list(job.calib_ids.shape),
        **dataclasses.asdict(job.config), "method": job.config.name,
        "plan": None if job.plan is None else job.plan.to_dict(),
        "batch_size": job.batch_size, "device": job.device.type, "world_size": job.ranks.world,
    }


def _analyze(job: _Job) -> tuple[RankPlan, dict[str, Spectrum], dict[str, float]]:
    """:func:`analyze` once its inputs are checked."""
    config, plan, ranks = job.config, job.plan, job.ranks
    linears = target_linears(job.model, include=config.include, exclude=config.exclude)
    if plan is not None:
        plan.validate({name: (m.out_features, m.in_features) for name, m in linears.items()})
        linears = {name: linears[name] for name in plan.ranks}  # a plan names the layers it changes
    caps = {name: (plan[name].rank or 1) if plan is not None else config.factor_cap(m.out_features, m.in_features)
            for name, m in linears.items()}
    work = None if job.work_dir is None else WorkDir(job.work_dir, _run_settings(job, linears), resume=job.resume,
                                                     ranks=ranks)
    seconds: dict[str, float] = {}
    judge_ranks = _judge_ranks(config, plan, linears)
    spectra = stream_spectra(job.model, linears, caps, calib_ids=job.calib_ids, whiten=config.whiten,
                              shrinkage=config.shrinkage, judge_ranks=judge_ranks,
                              batch_size=job.batch_size, device=job.device, work=work, ranks=ranks,
                              seconds=seconds, progress=job.progress)
    if plan is None:
        start = time.perf_counter()
        plan = _allocate(job, spectra, linears)
        seconds["allocation"] = time.perf_counter() - start
    if config.shrinkage:  # a new plan object: a plan the caller passed in stays as it was
        plan = dataclasses.replace(plan, params={**plan.params, **_shrinkage_record(config, spectra, judge_ranks)})
    return plan, spectra, seconds


def _judge_ranks(config: MethodConfig, plan: RankPlan | None, linears) -> dict[str, int | None]:
    """The rank at which ``shrinkage="auto"`` judges each layer: the plan's (none for a dense
    layer), else the uniform rank at the config's keep (allocators move ranks around it)."""
    if config.shrinkage != AUTO:
        return {}
    if plan is not None:
        return {name: plan[name].rank for name in linears}
    return {name: uniform_rank(m.out_features, m.in_features, config.keep) for name, m in linears.items()}


def _shrinkage_record(config: MethodConfig, spectra: Mapping[str, Spectrum], judge_ranks) -> dict:
    """What the plan records of shrinkage: the strength, and with "auto" how many layers got each
    (of those judged: a layer the applied plan keeps dense has no rank to judge at)."""
    if config.shrinkage != AUTO:
        return {"shrinkage": config.shrinkage}
    chosen = Counter(float(s.shrinkage) for name, s in spectra.items() if judge_ranks.get(name))
    return {"shrinkage": AUTO, "shrinkage_chosen": {f"{k:g}": chosen[k] for k in sorted(chosen)}}


def _allocate(job: _Job, spectra: dict[str, Spectrum], linears) -> RankPlan:
    """The config's plan, made on rank 0 (or on every rank, for methods that train
    data-parallel) and rank 0's sent to all."""
    config, ranks = job.config, job.ranks
    plan = None
    if ranks.world > 1 and config.data_parallel:
        spectra = spectra_everywhere(spectra, linears, ranks)
    if ranks.main or config.data_parallel:
        ids = job.calib_ids if job.select_ids is None else job.select_ids
        score = None if ids is None else _plan_loss(job.model, spectra, ids[:SCORE_WINDOWS])
        inputs = AllocationInputs(spectra, model_id=job.model_id, model=job.model, calib_ids=ids, score=score,
                                  progress=job.progress and ranks.main, ranks=ranks)
        device = _forward_device(job, spectra)
        with module_on(job.model, device) if device is not None else contextlib.nullcontext():
            plan = config.allocate(inputs)
        plan.params["whiten"] = config.whiten
    return ranks.broadcast_object(plan)


# The share of the device's free memory that the model and the factors an allocator trains over
# may take; the rest is for activations, gradients and the LM head's logits.
FORWARD_MEMORY_SHARE = 0.7


def _forward_device(job: _Job, spectra: Mapping[str, Spectrum], free_bytes: Callable[[torch.device], int] | None = None):
    """Where an allocator that runs the whole model (ARA, D-Rank's ``beta="auto"``) runs it: on
    ``job.device`` when the model and the spectra fit there beside the activations; None (where
    the model is) otherwise, and for allocators that never run it (on an H200, ARA on SmolLM2 kept
    in host memory took 345 s of a 408 s compress)."""
    home = next(job.model.parameters()).device
    if not job.config.needs_model_forward or job.device == home or job.device.type != "cuda":
        return None
    element = next(job.model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in job.model.parameters())
    factors = sum((s.left.numel() + s.right.numel()) * element for s in spectra.values())
    free = (free_bytes or _cuda_free_bytes)(job.device)
    if weights + factors <= FORWARD_MEMORY_SHARE * free:
        return job.device
    warnings.warn(f"{job.config.name} runs the model on {home}, slowly: the model and the factors it trains over "
                  f"take {(weights + factors) / 2**30:.1f} GiB, more than {FORWARD_MEMORY_SHARE:.0%} of the "
                  f"{free / 2**30:.1f} GiB free on {job.device}", stacklevel=2)
    return None


def _cuda_free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def _refinement(job: _Job) -> dict:
    """compensated_factors' refinement arguments: none, or the config's on held-out windows."""
    if not job.config.refine_steps:
        return {}
    refine = RefineConfig(steps=job.config.refine_steps, lr=job.config.refine_lr,
                          compute_dtype=job.config.compute_dtype)
    return {"refine": refine, "held_ids": job.select_ids[:REFINE_HELD_WINDOWS]}


@torch.no_grad()
def _copy_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for name, weight in weights.items():
        target = model.get_submodule(name).weight
        target.copy_(weight.to(target.device, target.dtype))


def _compensation_record(config: MethodConfig, found: Compensated) -> dict:
    """What the plan records of sequential compression (its settings) and of refinement (what it gained)."""
    record = {"sequential": True, "ridge": config.ridge} if config.sequential else {}
    reports = [r for r in found.refined if r is not None]
    if reports:
        record["refine"] = {
            "steps": config.refine_steps, "relative_lr": config.refine_lr, "held_windows": REFINE_HELD_WINDOWS,
            "compute_dtype": config.compute_dtype,
            "steps_run": sum(r.steps_run for r in reports), "dense_layers_trained": len(found.weights),
            "blocks_improved": sum(r.best_step > 0 for r in reports),
            "held_error_before": [round(r.held_before, 6) for r in reports],
            "held_error_after": [round(r.held_after, 6) for r in reports],
        }
    return record


def compress(
    model: nn.Module,
    config: MethodConfig | None = None,
    *,
    calib_ids: torch.Tensor | None = None,
    plan: RankPlan | None = None,
    model_id: str = "",
    batch_size: int = 8,
    device: torch.device | str | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    select_ids: torch.Tensor | None = None,
) -> CompressResult:
    """Compress ``model`` in place: its target linears become ``LowRankLinear`` per a rank plan.

    Under ``torch.distributed`` (e.g. started by ``torchrun``) every rank calls this with the
    same arguments: the calibration windows are split across ranks, each layer is factorized on
    one rank, and rank 0 ends with the compressed model; the other ranks' models stay as they
    were (they get the same plan back).

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
        work_dir: keep each finished block's factors in this directory instead of in memory,
            so that a killed run can resume (see :class:`~lowrank_infer.workdir.WorkDir`).
        resume: continue the run ``work_dir`` holds (its settings must match these).
        progress: show progress bars.
        select_ids: ``[samples, seq_len]`` held-out token ids for the choices made on the model's
            output (ARA's mask training, D-Rank's ``beta="auto"``, block refinement's stopping on its
            first ``REFINE_HELD_WINDOWS``), best disjoint from ``calib_ids`` so that those choices are
            not made on the windows the whitening was fitted to (default: ``calib_ids``; refinement
            requires them).

    Returns:
        The applied plan (also attached to ``model.config``) and per-stage timings.

    Raises:
        ValueError: missing calibration data, a plan that contradicts the config or does not
            fit the model, an already compressed model, a work directory that holds another run.
    """
    job = _job(model, config, plan, calib_ids, batch_size, device, work_dir, resume, model_id=model_id,
               progress=progress, select_ids=select_ids)
    config, plan = job.config, job.plan
    seconds, trained = {}, {}
    if plan is None or not config.sequential:  # a given plan needs no spectra when refitted
        plan, spectra, seconds = _analyze(job)
    if config.sequential or config.refine_steps:
        start = time.perf_counter()
        initial = None if config.sequential else (lambda name: spectra[name].factors(plan[name].rank))
        found = compensated_factors(model, plan, calib_ids, ridge=config.ridge, batch_size=batch_size,
                                    device=job.device, progress=progress, initial=initial, **_refinement(job))
        seconds["compensation"] = time.perf_counter() - start
        # A new plan object: a plan the caller passed in stays as it was.
        plan = dataclasses.replace(plan, params={**plan.params, **_compensation_record(config, found)})
        apply_plan(model, plan, lambda name, rank: found.factors[name])
        trained = found.weights  # the layers kept dense that refinement trained
    elif job.ranks.main:
        apply_plan(model, plan, lambda name, rank: spectra[name].factors(rank))
    if job.ranks.main:
        if offload.holds(model):
            offload.load(model, "cpu")  # what stays dense (norms, layers the plan keeps) now
        _copy_weights(model, trained)
        attach_plan(model, plan)
    return CompressResult(plan=plan, seconds=seconds)
