"""ARA: ranks learned by training one probability vector per layer on the language-model loss.

Xv et al., "ARA: Adaptive Rank Allocation for Efficient Large Language Model SVD Compression"
(arXiv 2510.19389). Each target linear is factorized up to ``k_max`` = the rank at keep 1.2, so
that its dense weight stays reachable. A layer holds logits over the kept fractions
``c = 1.00, 0.99, …, 0.00`` of ``k_max``; ``p = softmax(logits)`` and the expected fraction is
``ρ = cᵀp``. A staircase matrix (row ``i`` = ``⌊cᵢ·k_max⌋`` ones, then zeros) maps ``p`` to a soft
mask over singular directions, ``maskⱼ = P(kept rank > j)``, which is non-increasing by
construction. The forward pass uses the hard mask (the first ``round(ρ·k_max)`` directions) and
the backward pass the soft mask's gradient (straight-through). A layer whose hard rank reaches
break-even runs its original dense weight. Only the logits train, with

    loss = CE(calibration text) + α·(R − keep)² + β·mean_l[(1 − r_l)·𝟙(1 − r_l < err_l(r_l))]

where ``r_l = min(ρ_l·k_max(m+n)/(mn), 1)`` is a layer's parameter ratio, ``R`` their
size-weighted mean, and ``err_l(r)`` the relative whitened truncation error at ratio ``r``: the
guidance term pushes toward dense the layers whose parameter saving ``1 − r`` is smaller than the
error it costs. At the end layers with ``r ≥ 0.99`` become dense, the others' fractions are
rescaled so the total meets ``keep``, and the plan is repaired to the budget.

Where this implementation deviates from the paper and its official code, and why:

- **A CPU-sized schedule.** The official run trains 10 epochs over 256 × 512-token samples at
  ``lr = 1e-3``; the defaults here (100 steps of one 128-token row from 32 calibration rows,
  ``lr = 0.02``) fit a small model on a few CPU cores in minutes, and the larger learning rate
  makes up for the ~25× fewer steps. ``α = 100``, ``β = 50`` and the 101 candidates are the
  official values.
- **Exact error lookup.** ``err_l(r)`` is read at the rank ``⌊r·mn/(m+n)⌋`` itself, not at ``r``
  rounded to the nearest 0.01 as in the official code.
- **Exact final budget.** The official code rescales the kept fractions once (which lands near
  the target); here the rescale is followed by the shared greedy repair
  (:func:`~lowrank_infer.allocation.budget.fit_budget`, marginal value = captured whitened
  energy per parameter), which also applies ``multiple_of``.
- **keep = 1** returns the all-dense plan without training (nothing can be saved).
- **Training tokens.** The ids given are used, every row cut into ``seq_len``-token pieces, up
  to ``samples`` of them, each row's first piece before any row's second: the default trains on
  the first 128 tokens of 32 held-out windows (100 steps cycle over them about three times);
  ``samples=128`` trains on 100 distinct pieces of the same windows at the same cost, which on
  SmolLM2 moved single runs both ways, by up to 4.1 % (``benchmarks/results/quality_smollm2_findings.md``),
  so it is not the default. Likewise ``batch_size=2`` cuts the disagreement between two row orders' plans by
  about a third (``benchmarks/ara_batch_spread.py``) at twice the time, but did not lower
  perplexity over four seeds (the same file), so one row a step stays the default. ``orders=2``
  trains from two row orders and keeps the plan the pipeline scores lower (8 held-out windows):
  at the seed whose run was worst it kept the default order (loss 4.0567 against 4.0761), so the
  plan and the perplexity (38.27) were the same; untried at other seeds, it stays off. ``compress``
  passes windows held out from the whitening ones (``select_ids``; the CLI takes them from the
  last 10 % of the calibration text), so the masks are not trained on the windows the whitening
  was fitted to. The official code draws separate training samples (C4 by
  default).
- **Optional KL loss.** ``loss="kl"`` trains against the dense model's whole next-token
  distribution (computed each step with the masks off) instead of the text's one-hot next token.
- **The outcome is recorded.** The plan's params carry the size-weighted ratio training ended at
  (``final_ratio``), the factor the remaining fractions were rescaled by (``rescale``) and how
  many layers the threshold sent dense (``dense_at_threshold``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowrank_infer.allocation.budget import captured_energy, fit_budget, spectra_shapes
from lowrank_infer.allocation.config import AllocationInputs, MethodConfig
from lowrank_infer.allocation.plan import RankPlan, plan_from_ranks
from lowrank_infer.cost import layer_params, use_dense
from lowrank_infer.cpu_attention import steering_attention
from lowrank_infer.distributed import Ranks
from lowrank_infer.factorize import Spectrum
from lowrank_infer.precision import autocast
from lowrank_infer.structure import replace_module

__all__ = ["ARAConfig", "ARATrainingError", "ara_plan"]

# Candidate kept fractions 1.00, 0.99, …, 0.00 of k_max: 101 of them, as in the paper.
RESOLUTION = 100
LOSSES = ("ce", "kl")
# Factors are kept up to the rank at keep 1.2, past break-even, so that dense stays reachable.
RANK_HEADROOM = 1.2


class ARATrainingError(ValueError):
    """ARA's loss became NaN or infinite; ``last_good_plan`` is the plan from the last finite step."""

    def __init__(self, message: str, last_good_plan: RankPlan, step: int):
        super().__init__(message)
        self.last_good_plan = last_good_plan
        self.step = step


def _candidates(resolution: int = RESOLUTION) -> torch.Tensor:
    return torch.arange(resolution, -1, -1, dtype=torch.float64) / resolution


def _staircase(resolution: int, k_max: int) -> torch.Tensor:
    """``[resolution+1, k_max]``: row ``i`` keeps the first ``⌊cᵢ·k_max⌋`` directions (integer math)."""
    kept = (torch.arange(resolution, -1, -1) * k_max) // resolution
    return (torch.arange(k_max)[None, :] < kept[:, None]).to(torch.float32)


def _init_logits(fraction: float, resolution: int = RESOLUTION) -> torch.Tensor:
    """Two-level logits whose softmax has expectation ``fraction`` over the candidates.

    Candidates at or above the target share one logit ``δ``, the rest 0; ``δ`` solves
    ``(e^δ·S₁ + S₂) / (e^δ·n₁ + n₂) = fraction`` (the official initialization).
    """
    c = _candidates(resolution)
    fraction = min(max(fraction, 0.5 / resolution), 1 - 0.5 / resolution)
    above = c >= fraction
    s1, n1 = float(c[above].sum()), int(above.sum())
    s2, n2 = float(c[~above].sum()), int((~above).sum())
    delta = math.log((s2 - fraction * n2) / (fraction * n1 - s1))
    return torch.where(above, delta, 0.0).to(torch.float32)


class _MaskedLinear(nn.Module):
    """A target linear during ARA training: masked factors, or its own dense weight past break-even."""

    def __init__(self, linear: nn.Linear, spectrum: Spectrum, init_fraction: float):
        super().__init__()
        self.linear = linear
        weight = linear.weight
        self.register_buffer("left", spectrum.left.to(weight.device, weight.dtype), persistent=False)
        self.register_buffer("right", spectrum.right.to(weight.device, weight.dtype), persistent=False)
        self.register_buffer("candidates", _candidates().to(weight.device, torch.float32), persistent=False)
        self.register_buffer("stair", _staircase(RESOLUTION, spectrum.max_rank).to(weight.device), persistent=False)
        self.logits = nn.Parameter(_init_logits(init_fraction).to(weight.device))
        self.teacher = False  # True: the dense layer, for the KL loss's targets

    @property
    def k_max(self) -> int:
        return self.left.shape[1]

    def fraction(self) -> torch.Tensor:
        """Expected kept fraction ``ρ = cᵀ softmax(logits)`` of ``k_max`` (differentiable)."""
        return self.logits.softmax(-1) @ self.candidates

    def mask(self) -> tuple[torch.Tensor, int]:
        """Straight-through mask (hard forward, soft backward) and the hard rank."""
        probs = self.logits.softmax(-1)
        rank = int(torch.round(probs.detach() @ self.candidates * self.k_max))
        soft = probs @ self.stair
        hard = (torch.arange(self.k_max, device=soft.device) < rank).to(soft.dtype)
        return hard + soft - soft.detach(), rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher:
            return self.linear(x)
        mask, rank = self.mask()
        if use_dense(self.linear.out_features, self.linear.in_features, rank):
            return self.linear(x)
        return F.linear((x @ self.right) * mask.to(x.dtype), self.left, self.linear.bias)


@dataclass(frozen=True)
class ARAConfig(MethodConfig):
    """ARA: per-layer kept fractions trained on the language-model loss (needs calibration data).

    Attributes:
        steps: optimizer steps.
        lr: AdamW learning rate of the logits.
        alpha: weight of ``(R − keep)²``.
        beta: weight of the guidance loss toward dense layers.
        samples: most training rows, cut from the calibration rows (see :func:`_training_ids`).
        seq_len: tokens per training row.
        batch_size: rows per step.
        dense_threshold: a layer whose learned parameter ratio reaches this stays dense.
        seed: order of the training rows.
        orders: train from this many row orders (seeds ``seed``, ``seed + 1``, …) and keep the plan
            with the lowest calibration loss (the pipeline's plan score, as D-Rank's ``beta="auto"``);
            1 = one run, no scoring.
        loss: ``"ce"``: cross-entropy on the next tokens of the text (the paper's); ``"kl"``: KL
            divergence from the dense model's next-token distribution (one more forward a step; the
            dense model's whole distribution, not one token, is what the plan should preserve).
    """

    steps: int = 100
    lr: float = 0.02
    alpha: float = 100.0
    beta: float = 50.0
    samples: int = 32
    seq_len: int = 128
    batch_size: int = 1
    dense_threshold: float = 0.99
    seed: int = 0
    orders: int = 1
    loss: str = "ce"

    name: ClassVar[str] = "ara"
    data_parallel: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for label in ("steps", "samples", "seq_len", "batch_size", "orders"):
            if getattr(self, label) < 1:
                raise ValueError(f"ARA needs {label} >= 1, got {getattr(self, label)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"ARA needs a positive, finite lr, got {self.lr}")
        if self.loss not in LOSSES:
            raise ValueError(f"ARA's loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def needs_model_forward(self) -> bool:
        return True

    def factor_cap(self, out_features: int, in_features: int) -> int:
        """Past break-even (the rank at keep ``RANK_HEADROOM``), so that dense stays reachable."""
        m, n = out_features, in_features
        return min(m, n, math.ceil(RANK_HEADROOM * m * n / (m + n)))

    def allocate(self, inputs: AllocationInputs) -> RankPlan:
        if inputs.model is None or inputs.calib_ids is None:
            raise ValueError("ARA trains on the model: it needs the model and calibration token ids")
        if self.orders > 1 and inputs.score is None:
            raise ValueError(f"ARA orders={self.orders} keeps the plan with the lowest calibration loss; "
                             "nothing scores plans here (pass calibration token ids, or set orders=1)")

        def plan(seed: int) -> RankPlan:
            return ara_plan(inputs.model, inputs.spectra, inputs.calib_ids, self.replace(seed=seed),
                            model_id=inputs.model_id, progress=inputs.progress, group=inputs.ranks)

        if self.orders == 1:
            return plan(self.seed)
        seeds = range(self.seed, self.seed + self.orders)
        return inputs.lowest_loss(((seed, plan(seed)) for seed in seeds), "ARA", "seed")


def ara_plan(
    lm: nn.Module,
    spectra: Mapping[str, Spectrum],
    calib_ids: torch.Tensor,
    config: ARAConfig,
    *,
    model_id: str = "",
    progress: bool = True,
    group: Ranks = Ranks(),
) -> RankPlan:
    """ARA allocation: train per-layer kept-fraction distributions on the LM loss, then finalize.

    The target linears named in ``spectra`` are swapped for trainable masked modules for the
    duration of training; the original modules, ``requires_grad`` flags and train/eval mode are
    restored before returning, also on error.

    Args:
        lm: the dense causal LM (e.g. ``LlamaForCausalLM``); it returns ``.logits``.
        spectra: name → whitened :class:`Spectrum` with factors up to ``config.factor_cap``.
        calib_ids: ``[samples, seq_len]`` calibration token ids.
        config: keep, ``multiple_of`` and the training settings.
        model_id: recorded in the plan.
        progress: show a progress bar with the loss and the parameter ratio ``R``.
        group: under ``torch.distributed``, every rank calls this with the same arguments and
            trains on its share of each batch, gradients summed (data-parallel); the plan equals
            the single-process one up to round-off.

    Raises:
        ValueError: empty spectra, NaN in them, a spectrum naming no linear of ``lm`` (or of
            another shape), malformed ``calib_ids``.
        ARATrainingError: the loss became NaN; carries ``last_good_plan``.
    """
    if config.batch_size < group.world:
        raise ValueError(f"ARA's batch_size ({config.batch_size}) must be at least the number of ranks "
                         f"({group.world}) to train data-parallel: set --param batch_size={group.world} or more")
    shapes = spectra_shapes(spectra)
    linears = _check_linears(lm, spectra)
    ids = _training_ids(calib_ids, config)
    # What the plan records: the settings, with the rows and tokens actually trained on.
    record = {**config.hyperparameters(), "samples": ids.shape[0], "seq_len": ids.shape[1],
              "multiple_of": config.multiple_of, "compute_dtype": config.compute_dtype}

    def finalize(fractions: Mapping[str, float]) -> RankPlan:
        ranks, outcome = _final_ranks(spectra, fractions, config)
        return plan_from_ranks(shapes, ranks, keep=config.keep, method="ara", model=model_id,
                               params={**record, **outcome})

    if config.keep == 1.0:
        return finalize({name: 1.0 for name in spectra})
    masked = {name: _MaskedLinear(linears[name], s, config.keep / _headroom(s)) for name, s in spectra.items()}
    regularizer = _Regularizer(shapes, spectra, list(masked.values()), config.keep)
    with _swapped(lm, masked):
        fractions = _train(lm, masked, regularizer, ids, config, finalize, progress, group)
    return finalize(fractions)


def _check_linears(lm: nn.Module, spectra: Mapping[str, Spectrum]) -> dict[str, nn.Linear]:
    linears = {}
    for name, spectrum in spectra.items():
        try:
            module = lm.get_submodule(name)
        except AttributeError:
            raise ValueError(f"spectrum {name!r} names no module of the model") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"spectrum {name!r} names a {type(module).__name__}, not an nn.Linear")
        if (module.out_features, module.in_features) != (spectrum.out_features, spectrum.in_features):
            raise ValueError(
                f"layer {name!r} is {module.out_features}x{module.in_features} but its spectrum is "
                f"{spectrum.out_features}x{spectrum.in_features}"
            )
        if not (torch.isfinite(spectrum.left).all() and torch.isfinite(spectrum.right).all()):
            raise ValueError(f"layer {name!r}: its spectrum's factors contain NaN or Inf")
        linears[name] = module
    return linears


def _training_ids(calib_ids: torch.Tensor, config: ARAConfig) -> torch.Tensor:
    """The first ``samples`` rows of ``seq_len`` tokens, cut from every row in turn: each row's
    first piece, then each row's second, and so on (rows shorter than ``seq_len`` are used whole)."""
    if calib_ids.ndim != 2 or calib_ids.shape[1] < 2:
        raise ValueError(f"calib_ids must be [samples, seq_len >= 2] token ids, got shape {tuple(calib_ids.shape)}")
    rows, length = calib_ids.shape
    if length <= config.seq_len:
        return calib_ids[: config.samples]
    per_row = length // config.seq_len
    pieces = calib_ids[:, : per_row * config.seq_len].reshape(rows, per_row, config.seq_len)
    return pieces.transpose(0, 1).reshape(-1, config.seq_len)[: config.samples]


def _headroom(spectrum: Spectrum) -> float:
    """Parameter ratio of a layer at ``k_max``: ``k_max(m+n)/(mn)`` (about 1.2)."""
    m, n = spectrum.out_features, spectrum.in_features
    return layer_params(m, n, spectrum.max_rank) / layer_params(m, n, None)


@contextmanager
def _swapped(lm: nn.Module, masked: Mapping[str, _MaskedLinear]):
    """Masked modules in, the model frozen and in eval mode; all of it undone on exit."""
    flags = [(p, p.requires_grad) for p in lm.parameters()]
    training = lm.training
    try:
        lm.requires_grad_(False).eval()
        for name, module in masked.items():
            replace_module(lm, name, module)
        yield
    finally:
        for name, module in masked.items():
            replace_module(lm, name, module.linear)
        for p, flag in flags:
            p.requires_grad_(flag)
        lm.train(training)


def _train(lm, masked, regularizer, ids, config: ARAConfig, finalize, progress, group: Ranks) -> dict[str, float]:
    """AdamW on the logits; returns each layer's final expected fraction ``ρ``.

    Raises ARATrainingError at a non-finite loss or update, with the plan of the last finite logits.
    """
    layers = list(masked.values())
    for layer in layers:
        layer.logits.requires_grad_(True)
    optimizer = torch.optim.AdamW([layer.logits for layer in layers], lr=config.lr, weight_decay=0.0)
    device = layers[0].logits.device
    size = config.batch_size
    order = _row_order(ids.shape[0], config.steps * size, config.seed)
    last_good = [layer.logits.detach().clone() for layer in layers]

    def failure(what: str, step: int) -> ARATrainingError:
        fractions = {name: _fraction_of(logits) for name, logits in zip(masked, last_good)}
        message = f"ARA {what} at step {step}; the plan from the last finite step is in .last_good_plan"
        return ARATrainingError(message, finalize(fractions), step)

    bar = tqdm(range(config.steps), desc="ARA", unit="step", disable=not progress)
    with torch.enable_grad(), steering_attention(lm, config.compute_dtype):
        for step in bar:
            batch = ids[order[step * size : (step + 1) * size]]
            with autocast(config.compute_dtype, device):
                fit = _data_parallel_loss(lm, layers, batch, group, device, config.loss)
            ratio, compression, guidance = regularizer()
            penalty = config.alpha * compression + config.beta * guidance
            loss = fit.detach() + penalty.detach()
            if not torch.isfinite(loss):
                raise failure(f"loss became {loss.item()} ({config.loss} {fit.item()})", step)
            optimizer.zero_grad(set_to_none=True)
            # Every rank adds its share of the data loss and 1/world of the (identical)
            # penalty; the summed gradients are the single-process batch's.
            (fit + penalty / group.world).backward()
            for layer in layers:
                group.all_reduce_sum(layer.logits.grad)
            optimizer.step()
            current = [layer.logits.detach().clone() for layer in layers]
            if not all(torch.isfinite(logits).all() for logits in current):
                raise failure("update made the logits non-finite", step)
            last_good = current
            bar.set_postfix(loss=f"{loss.item():.3f}", **{config.loss: f"{fit.item():.3f}"}, R=f"{ratio.item():.3f}")
    return {name: _fraction_of(logits) for name, logits in zip(masked, last_good)}


def _data_parallel_loss(lm, layers, batch: torch.Tensor, group: Ranks, device, loss: str) -> torch.Tensor:
    """This rank's rows' share of the batch's mean next-token loss (cross-entropy, or KL from the
    dense model); its value (not its gradient) is summed over ranks, so every rank sees the whole
    batch's loss."""
    rows = group.shard(batch).to(device)
    logits = lm(input_ids=rows, use_cache=False).logits[:, :-1].float()
    if loss == "kl":
        with torch.no_grad(), _as_teacher(layers):
            dense = lm(input_ids=rows, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        student = logits.log_softmax(-1)
        total = (dense.exp() * (dense - student)).sum()
    else:
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
    share = total / (batch.shape[0] * (batch.shape[1] - 1))
    others = group.all_reduce_sum(share.detach().clone()) - share.detach()
    return share + others


@contextmanager
def _as_teacher(layers):
    for layer in layers:
        layer.teacher = True
    try:
        yield
    finally:
        for layer in layers:
            layer.teacher = False


def _row_order(rows: int, needed: int, seed: int) -> torch.Tensor:
    """Row indices for ``needed`` draws: shuffled epochs, concatenated."""
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-needed // rows)
    return torch.cat([torch.randperm(rows, generator=generator) for _ in range(epochs)])[:needed]


def _fraction_of(logits: torch.Tensor) -> float:
    return float(logits.float().softmax(-1).cpu() @ _candidates().float())


class _Regularizer:
    """``R``, the compression loss ``(R − keep)²`` and the guidance loss, from the layers' logits."""

    def __init__(self, shapes, spectra, layers: list[_MaskedLinear], keep: float):
        device = layers[0].logits.device
        self.layers = layers
        self.keep = keep
        self.shapes = list(shapes.values())
        self.dense = torch.tensor([m * n for m, n in self.shapes], dtype=torch.float64, device=device)
        self.headroom = torch.tensor([_headroom(s) for s in spectra.values()], dtype=torch.float64, device=device)
        # err[l][k]: relative whitened truncation error of layer l kept at rank k.
        self.errors = [
            [math.sqrt(max(0.0, 1.0 - e)) for e in captured_energy(s.sigma)] for s in spectra.values()
        ]

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rho = torch.stack([layer.fraction() for layer in self.layers]).to(torch.float64)
        ratio = torch.clamp(rho * self.headroom, max=1.0)
        total = (ratio * self.dense).sum() / self.dense.sum()
        error = torch.tensor(
            [self._error(i, float(r)) for i, r in enumerate(ratio.detach())], dtype=torch.float64, device=ratio.device
        )
        active = (1 - ratio.detach()) < error
        guidance = ((1 - ratio) * active).mean()
        return total, (total - self.keep) ** 2, guidance

    def _error(self, i: int, ratio: float) -> float:
        m, n = self.shapes[i]
        table = self.errors[i]
        return table[min(int(ratio * m * n / (m + n)), len(table) - 1)]


def _final_ranks(
    spectra: Mapping[str, Spectrum], fractions: Mapping[str, float], config: ARAConfig
) -> tuple[dict[str, int | None], dict[str, float]]:
    """Dense where the learned ratio reaches ``dense_threshold``; rescale the rest to the budget.
    Also what the plan records of it: the size-weighted ratio ``R`` training ended at, the factor
    the other layers' fractions were rescaled by, and how many layers the threshold sent dense."""
    shapes = {name: (s.out_features, s.in_features) for name, s in spectra.items()}
    ratio = {name: fractions[name] * _headroom(s) for name, s in spectra.items()}
    dense = {name for name, r in ratio.items() if r >= config.dense_threshold}
    total = sum(m * n for m, n in shapes.values())
    fixed = sum(m * n for name, (m, n) in shapes.items() if name in dense)
    variable = sum(ratio[name] * m * n for name, (m, n) in shapes.items() if name not in dense)
    scale = max(config.keep * total - fixed, 0.0) / variable if variable > 0 else 1.0
    ranks = {
        name: None if name in dense else max(1, math.floor(fractions[name] * scale * s.max_rank))
        for name, s in spectra.items()
    }
    energy = {name: captured_energy(s.sigma) for name, s in spectra.items()}

    def value(name: str, rank: int | None) -> float:
        return 1.0 if rank is None else energy[name][min(rank, len(energy[name]) - 1)]

    caps = {name: s.max_rank for name, s in spectra.items()}
    trained = sum(min(r, 1.0) * m * n for r, (m, n) in zip(ratio.values(), shapes.values())) / total
    outcome = {"final_ratio": round(trained, 6), "rescale": round(scale, 6), "dense_at_threshold": len(dense)}
    return fit_budget(shapes, ranks, config.keep, value, caps=caps, multiple_of=config.multiple_of), outcome
