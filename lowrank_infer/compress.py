"""One in-place entry point: calibrate, factorize, allocate ranks, swap modules."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_infer.allocation import METHODS, AllocationInputs, MethodConfig, RankPlan, UniformConfig
from lowrank_infer.calibration import block_grams, block_linears, block_stream
from lowrank_infer.compensation import compensated_factors
from lowrank_infer.distributed import Ranks
from lowrank_infer.evaluate import mean_nll
from lowrank_infer.factorize import Spectrum, plain_svd, whitened_svd
from lowrank_infer.io import attach_plan
from lowrank_infer.structure import decoder_blocks, target_linears
from lowrank_infer.surgery import apply_plan, check_uncompressed, plan_applied
from lowrank_infer.workdir import WorkDir

__all__ = ["CompressResult", "analyze", "compress", "config_for", "needs_calibration", "run_settings"]

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


def _factorize(linear: nn.Linear, gram: torch.Tensor | None, cap: int, device, name: str) -> Spectrum:
    """Whitened (``gram`` given) or plain SVD of one linear, factors kept up to ``cap``."""
    weight = linear.weight.to(device) if device is not None else linear.weight
    if gram is None:
        return plain_svd(weight, max_rank=cap, name=name)
    return whitened_svd(weight, gram.to(weight.device), max_rank=cap, name=name)


def _block_spectra(linears: Mapping[str, nn.Linear], grams, caps, device, ranks: Ranks) -> dict[str, Spectrum]:
    """Spectra of one block's linears: each factorized by its owner rank, then sent to all."""
    found = {}
    for j, (name, linear) in enumerate(linears.items()):
        owner = ranks.owner(j)
        gram = None if grams is None else grams[name]
        if ranks.rank == owner:
            spectrum = _factorize(linear, gram, caps[name], device, name)
        else:
            spectrum = Spectrum.empty(linear.out_features, linear.in_features, caps[name], whitened=gram is not None)
        found[name] = _broadcast_spectrum(spectrum, owner, ranks)
    return found


def _broadcast_spectrum(spectrum: Spectrum, src: int, ranks: Ranks) -> Spectrum:
    if ranks.world == 1:
        return spectrum
    sigma, left, right = (ranks.broadcast(t.contiguous(), src) for t in (spectrum.sigma, spectrum.left, spectrum.right))
    return Spectrum(sigma, left, right, spectrum.whitened)


def _stream_spectra(model, linears, caps, *, calib_ids, whiten, batch_size, device, work, ranks, seconds, progress):
    """Every linear's spectrum, one decoder block at a time: calibrate the block (each rank on
    its share of the windows, statistics summed), factorize its linears, drop its statistics.
    With a work directory each finished block goes to disk (and finished blocks are skipped);
    else rank 0 keeps the spectra in memory."""
    prefix, blocks = decoder_blocks(model)
    start = work.blocks_done if work is not None else 0
    todo = range(start, len(blocks))
    kept: dict[str, Spectrum] = {}
    bar = tqdm(total=len(blocks), initial=start, desc="analyze", unit="block", disable=not (progress and ranks.main))

    def finish(i, grams, hidden=None):
        began = time.perf_counter()
        found = _block_spectra(block_linears(linears, prefix, i), grams, caps, device, ranks)
        seconds["factorization"] = seconds.get("factorization", 0.0) + time.perf_counter() - began
        if work is not None:
            if hidden is not None and i + 1 < len(blocks):
                work.save_hidden(i + 1, hidden)
            work.finish_block(i, found)
        elif ranks.main:
            kept.update(found)
        bar.update()

    began = time.perf_counter()
    with bar:  # closed before an error propagates, so the error is the last line printed
        if not whiten:
            for i in todo:
                finish(i, None)
        elif todo:
            with block_stream(model, ranks.shard(calib_ids), batch_size=batch_size, device=device) as stream:
                hidden = work.load_hidden(start) if start else None
                for i, grams, hidden in block_grams(stream, linears, device=device, blocks=todo, hidden=hidden):
                    for gram in {id(g): g for g in grams.values()}.values():  # shared statistics once
                        ranks.all_reduce_sum(gram)
                    finish(i, grams, hidden)
            seconds["calibration"] = time.perf_counter() - began - seconds.get("factorization", 0.0)
    spectra = work.spectra() if work is not None and ranks.main else kept
    return {name: spectra[name] for name in linears} if ranks.main else {}


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


def _job(model, config, plan, calib_ids, batch_size, device, work_dir, resume, **rest) -> _Job:
    config = _resolve(config, plan)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_uncompressed(model)
    if needs_calibration(config, plan) and calib_ids is None:
        raise ValueError(f"{config.name} with whiten={config.whiten}, sequential={config.sequential} "
                         "needs calibration data (calib_ids)")
    if resume and work_dir is None:
        raise ValueError("resume needs the work directory of the run to continue (work_dir)")
    ranks = Ranks.current()
    if ranks.world > 1 and config.sequential:
        raise ValueError("sequential refitting runs in one process; start it without torchrun")
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
) -> tuple[RankPlan, dict[str, Spectrum], dict[str, float]]:
    """Calibrate, factorize and allocate without changing the model (arguments as :func:`compress`).

    Returns:
        ``(plan, spectra, seconds)``: the plan (``plan`` itself when given), each target
        linear's spectrum (on rank 0; empty on the other ranks of a process group), and the
        time per stage.
    """
    job = _job(model, config, plan, calib_ids, batch_size, device, work_dir, resume, model_id=model_id,
               progress=progress)
    return _analyze(job)


def run_settings(job: _Job, linears: Mapping[str, nn.Linear]) -> dict:
    """What makes two runs the same, for a work directory: a resume must match all of it."""
    digest = hashlib.sha256()
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
    work = None if job.work_dir is None else WorkDir(job.work_dir, run_settings(job, linears), resume=job.resume,
                                                     ranks=ranks)
    seconds: dict[str, float] = {}
    spectra = _stream_spectra(job.model, linears, caps, calib_ids=job.calib_ids, whiten=config.whiten,
                              batch_size=job.batch_size, device=job.device, work=work, ranks=ranks,
                              seconds=seconds, progress=job.progress)
    if plan is None:
        start = time.perf_counter()
        plan = _allocate(job, spectra, linears)
        seconds["allocation"] = time.perf_counter() - start
    return plan, spectra, seconds


def _allocate(job: _Job, spectra: dict[str, Spectrum], linears) -> RankPlan:
    """The config's plan, made on rank 0 (or on every rank, for methods that train
    data-parallel) and rank 0's sent to all."""
    config, ranks = job.config, job.ranks
    plan = None
    if ranks.world > 1 and config.data_parallel:
        spectra = _spectra_everywhere(spectra, linears, ranks)
    if ranks.main or config.data_parallel:
        ids = job.calib_ids
        score = None if ids is None else _plan_loss(job.model, spectra, ids[:SCORE_WINDOWS])
        inputs = AllocationInputs(spectra, model_id=job.model_id, model=job.model, calib_ids=ids, score=score,
                                  progress=job.progress and ranks.main, ranks=ranks)
        plan = config.allocate(inputs)
        plan.params["whiten"] = config.whiten
    return ranks.broadcast_object(plan)


def _spectra_everywhere(spectra, linears, ranks: Ranks) -> dict[str, Spectrum]:
    """Rank 0's spectra, factors in memory, on every rank (for allocators that train on every rank)."""
    meta = ranks.broadcast_object({n: (s.max_rank, s.whitened) for n, s in spectra.items()} if ranks.main else None)
    out = {}
    for name, linear in linears.items():
        cap, whitened = meta[name]
        if ranks.main:  # a stored spectrum's factors are read from disk here, once
            mine = Spectrum(spectra[name].sigma, spectra[name].left, spectra[name].right, whitened)
        else:
            mine = Spectrum.empty(linear.out_features, linear.in_features, cap, whitened=whitened)
        out[name] = _broadcast_spectrum(mine, 0, ranks)
    return out


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

    Returns:
        The applied plan (also attached to ``model.config``) and per-stage timings.

    Raises:
        ValueError: missing calibration data, a plan that contradicts the config or does not
            fit the model, an already compressed model, a work directory that holds another run.
    """
    job = _job(model, config, plan, calib_ids, batch_size, device, work_dir, resume, model_id=model_id,
               progress=progress)
    config, plan = job.config, job.plan
    seconds = {}
    if plan is None or not config.sequential:  # a given plan needs no spectra when refitted
        plan, spectra, seconds = _analyze(job)
    if config.sequential:
        start = time.perf_counter()
        refitted = compensated_factors(model, plan, calib_ids, ridge=config.ridge, batch_size=batch_size,
                                       device=job.device, progress=progress)
        seconds["compensation"] = time.perf_counter() - start
        # A new plan object: a plan the caller passed in stays as it was.
        plan = dataclasses.replace(plan, params={**plan.params, "sequential": True, "ridge": config.ridge})
        apply_plan(model, plan, lambda name, rank: refitted[name])
    elif job.ranks.main:
        apply_plan(model, plan, lambda name, rank: spectra[name].factors(rank))
    if job.ranks.main:
        attach_plan(model, plan)
    return CompressResult(plan=plan, seconds=seconds)
