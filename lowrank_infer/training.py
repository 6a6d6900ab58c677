"""Adam on a few tensors, stopped early on a held-out loss, the best values kept.

Shared by healing (the whole model's factors against the dense distributions) and block
refinement (one block's factors against the dense block's outputs): both must never leave the
model worse than they found it, so the starting values are scored first and win ties.

The learning rate is relative to each tensor's scale. Adam moves every coordinate by about its
learning rate whatever the gradient's size, and the two factors of a whitened SVD differ in scale
by one to two orders of magnitude (``U`` carries the singular values; ``V`` also undoes the
whitening, so it is small where the inputs are large): one absolute rate is then too small for
``U`` while it already throws ``V`` off, and the right value would change with every model's
weight scale. Each tensor therefore trains at ``lr`` times its root-mean-square value at the start.

Tensors stored in less than float32 (a bfloat16 or float16 model's factors) train through a
float32 copy that Adam updates and that is rounded into the tensor after every step. A step at
these rates moves a value by about 0.1 %, under half of bfloat16's spacing (0.4 %), so updating
the tensor itself would round most steps away: on a tiny bfloat16 model, 12 healing steps
changed under a third of the factors' values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from tqdm.auto import tqdm

from lowrank_infer.precision import autocast, check_compute_dtype

__all__ = ["EarlyStopped", "Schedule", "train_early_stopped"]


@dataclass(frozen=True)
class Schedule:
    """How long and how fast to train, and when to stop.

    Attributes:
        steps: most optimizer steps (each on ``batch_size`` windows, cycling through them).
        lr: Adam's learning rate relative to each tensor's scale: a tensor trains at ``lr`` times
            its root-mean-square value at the start (``lr`` itself for an all-zero tensor).
        batch_size: windows per step.
        eval_every: steps between held-out scores.
        patience: held-out scores without improvement before stopping.
        compute_dtype: dtype of the training and held-out forward passes (``"bfloat16"``: under
            autocast, see :mod:`lowrank_infer.precision`); the tensors keep their own dtype
            (those below float32 train through float32 copies, see the module docstring).
        decay: lower the rate linearly over the run, step ``s`` of ``steps`` at
            ``lr·(steps − s + 1)/steps`` (off here, on for healing: :class:`~lowrank_infer.healing.HealConfig`).
        warmup: steps over which the rate first rises linearly, step ``s`` at ``s/warmup`` of what
            it would be (0: none); it multiplies ``decay``'s factor.
    """

    steps: int
    lr: float = 1e-3
    batch_size: int = 2
    eval_every: int = 10
    patience: int = 3
    compute_dtype: str = "float32"
    decay: bool = False
    warmup: int = 0

    what: ClassVar[str] = "training"  # names the settings in error messages

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{self.what} {name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{self.what} lr must be a positive number, got {self.lr!r}")
        check_compute_dtype(self.compute_dtype)
        if not isinstance(self.decay, bool):
            raise ValueError(f"{self.what} decay must be True or False, got {self.decay!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or not 0 <= self.warmup <= self.steps:
            raise ValueError(f"{self.what} warmup must be an integer from 0 to steps ({self.steps}), got {self.warmup!r}")

    def rate_factor(self, step: int) -> float:
        """The share of ``lr`` that step ``step`` (from 1) takes: warmup's rise times decay's fall."""
        rise = min(1.0, step / self.warmup) if self.warmup else 1.0
        return rise * ((self.steps - step + 1) / self.steps if self.decay else 1.0)


@dataclass(frozen=True)
class EarlyStopped:
    """``held_before``/``held_after``: the held-out loss of the starting values and of those kept;
    ``best_step`` 0 = the starting values were kept (unchanged)."""

    steps_run: int
    best_step: int
    held_before: float
    held_after: float


def train_early_stopped(
    params: Sequence[torch.nn.Parameter],
    train_loss: Callable[[int], torch.Tensor],
    held_loss: Callable[[], float],
    schedule: Schedule,
    *,
    progress: bool = False,
) -> EarlyStopped:
    """Minimize ``train_loss(step)`` (step counts from 1) over ``params`` with Adam, scoring
    ``held_loss()`` before training and every ``schedule.eval_every`` steps; stops after
    ``schedule.patience`` scores without improvement and leaves ``params`` at the best-scoring values.

    Raises:
        ValueError: a loss is not finite; ``params`` are then back at their starting values.
    """
    original = [p.detach().clone() for p in params]
    try:
        return _train(params, original, train_loss, held_loss, schedule, progress)
    except ValueError:
        _restore(params, original)
        raise


def _train(params, original, train_loss, held_loss, schedule: Schedule, progress) -> EarlyStopped:
    steps, what = schedule.steps, schedule.what
    masters = [p if p.dtype == torch.float32 else p.detach().float() for p in params]
    # One group a tensor (relative rates): the fused kernel steps SmolLM2's 234 factors in half the time.
    optimizer = torch.optim.Adam(_relative_groups(masters, schedule.lr), fused=masters[0].device.type in ("cpu", "cuda"))

    def precision():
        return autocast(schedule.compute_dtype, params[0].device)

    with precision():
        best = before = _checked(held_loss(), "held-out loss before training", what)
    best_step, best_values, waited, step = 0, original, 0, 0
    bar = tqdm(total=steps, desc=what, unit="step", disable=not progress, leave=False)
    rates = [group["lr"] for group in optimizer.param_groups]
    for step in range(1, steps + 1):
        with precision():
            loss = train_loss(step)
        _checked(loss.item(), f"training loss at step {step}", what)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate * schedule.rate_factor(step)
        _step(optimizer, params, masters)
        bar.update()
        if step % schedule.eval_every and step != steps:
            continue
        with precision():
            current = _checked(held_loss(), f"held-out loss at step {step}", what)
        bar.set_postfix(held=f"{current:.4g}", best=f"{best:.4g}")
        if current < best:
            best, best_step, waited = current, step, 0
            best_values = [p.detach().clone() for p in params]
        else:
            waited += 1
            if waited >= schedule.patience:
                break
    bar.close()
    _restore(params, best_values)
    return EarlyStopped(steps_run=step, best_step=best_step, held_before=before, held_after=best)


def _step(optimizer, params, masters) -> None:
    """One Adam step on ``masters``, rounded into the ``params`` that are not their own master."""
    for p, master in zip(params, masters):
        if master is not p:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None
    optimizer.step()
    with torch.no_grad():
        for p, master in zip(params, masters):
            if master is not p:
                p.copy_(master)


def _relative_groups(params, lr: float) -> list[dict]:
    """One Adam parameter group per tensor, at ``lr`` times the tensor's RMS (see the module docstring)."""
    groups = []
    for p in params:
        rms = float(p.detach().float().square().mean().sqrt())
        groups.append({"params": [p], "lr": lr * rms if rms > 0 else lr})
    return groups


def _restore(params, values) -> None:
    with torch.no_grad():
        for p, value in zip(params, values):
            p.copy_(value)


def _checked(value: float, where: str, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what}: {where} is {value}; the factors were restored (try a smaller lr)")
    return value
