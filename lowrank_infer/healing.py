"""Healing: a short distillation of a compressed model's factors toward the dense model.

The dense model's next-token distributions on the healing windows are recorded before
compression (its ``top_k`` most likely tokens per position: 1 MiB a 512-token window at the
default 256, instead of a vocabulary-wide tensor, and no second model in memory); afterwards only
the low-rank factors ``U`` and ``V`` train, so the parameter count stays what the plan says.
The loss is the KL divergence between the two distributions coarsened to those tokens plus one
bucket for the rest of the vocabulary,
``Σ_top p_dense · (log p_dense − log p_compressed) + r_dense · (log r_dense − log r_compressed)``
with ``r = 1 − Σ_top p``. The bucket matters: the sum over the top tokens alone is lowest when the
compressed model moves the rest of the vocabulary's probability onto them, which is what a
healing run on it learns, and rare words (most of them outside any top 64) then cost more than
before healing. With ``top_k`` the whole vocabulary the loss is the exact KL divergence
(:mod:`lowrank_infer.healing_loss` computes it, through the output layer a chunk at a time). Training
stops early when the same loss on held-out windows (never trained on) stops improving, and the
factors that scored best there are kept; when no step beats the compressed model as it came, the
factors are left exactly as they were.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_infer.cpu_attention import steering_attention
from lowrank_infer.healing_loss import coarsened_kl, frozen_copy, fusable_head
from lowrank_infer.module import LowRankLinear
from lowrank_infer.precision import autocast, frozen_weights_cast
from lowrank_infer.structure import target_linears
from lowrank_infer.training import Schedule, train_early_stopped

__all__ = ["TOP_K", "HealConfig", "HealReport", "TeacherTargets", "check_heal_memory", "heal", "healing_bytes",
           "teacher_targets", "training_bytes_per_weight"]

# The dense model's most likely tokens that healing matches at each position. On SmolLM2 (one
# checkpoint, 320 steps) 256 scored a lower perplexity on held-out calibration text than 64
# (55.58 against 55.73) and as low as 1024 (55.57), healing about 5 % longer
# (benchmarks/results/cpu/heal_top_k_smollm2_320.txt).
TOP_K = 256


@dataclass(frozen=True)
class TeacherTargets:
    """The dense model's ``top_k`` log-probabilities at every position of some windows.

    Attributes:
        ids: ``[windows, seq_len]`` token ids.
        logp: ``[windows, seq_len, top_k]`` float32 log-probabilities, most likely first.
        index: ``[windows, seq_len, top_k]`` the tokens they belong to.
    """

    ids: torch.Tensor
    logp: torch.Tensor
    index: torch.Tensor

    def batch(self, rows: slice) -> "TeacherTargets":
        return TeacherTargets(self.ids[rows], self.logp[rows], self.index[rows])

    def top(self, k: int) -> "TeacherTargets":
        """The targets as ``teacher_targets(top_k=k)`` records them (``k`` at most this ``top_k``)."""
        if not 1 <= k <= self.logp.shape[-1]:
            raise ValueError(f"top {k} of targets that hold {self.logp.shape[-1]} tokens per position")
        return TeacherTargets(self.ids, self.logp[..., :k], self.index[..., :k])


@dataclass(frozen=True)
class HealConfig(Schedule):
    """Settings of :func:`heal` (see :class:`~lowrank_infer.training.Schedule`): 3 held-out scores
    of patience and by default about ten scores a run (every ``steps // 10`` steps, at least 10).
    Scored every 10 steps, a long run at one window a step stops on an early bounce of the
    held-out loss, well before it stops improving. The rate falls linearly to zero over the run
    by default: on SmolLM2 it reached a lower held-out loss than a constant rate in 250 steps and
    the same in 400 (``benchmarks/heal_schedule.py``)."""

    eval_every: int | None = None
    decay: bool = True
    what: ClassVar[str] = "heal"

    def __post_init__(self) -> None:
        if self.eval_every is None and isinstance(self.steps, int):
            object.__setattr__(self, "eval_every", max(10, self.steps // 10))
        super().__post_init__()


@dataclass(frozen=True)
class HealReport:
    """What :func:`heal` did: ``held_before``/``held_after`` are the held-out loss (nats per token)
    of the factors it started from and of those it kept; ``best_step`` 0 = kept the originals."""

    steps_run: int
    best_step: int
    held_before: float
    held_after: float
    seconds: float


def training_bytes_per_weight(element_size: int) -> int:
    """Bytes per trained factor weight besides the weight: gradient and Adam's two moments in
    float32, and below float32 also the float32 master and the gradient in the model's dtype
    (:mod:`lowrank_infer.training`)."""
    return 4 + 8 if element_size == 4 else 4 + 4 + 8 + element_size


def healing_bytes(model: nn.Module, keep: float, **patterns) -> int:
    """Device memory :func:`heal` needs for ``model`` once compressed to ``keep``, activations
    aside: the compressed model, and what training takes per factor weight for at most ``keep``
    of the target linears' weights (``patterns``: ``include``/``exclude`` as for compression)."""
    element = next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    target = sum(m.weight.numel() for m in target_linears(model, **patterns).values())
    return round(weights - (1 - keep) * target * element + keep * target * training_bytes_per_weight(element))


def check_heal_memory(model: nn.Module, keep: float, free_bytes: int, device: str, **patterns) -> None:
    """Refuse, before any work, healing that cannot fit in ``free_bytes`` of ``device``.

    Raises:
        ValueError: :func:`healing_bytes` exceeds ``free_bytes``.
    """
    need = healing_bytes(model, keep, **patterns)
    if need > free_bytes:
        extra = training_bytes_per_weight(next(model.parameters()).element_size())
        raise ValueError(f"--heal-steps trains every factor on {device} at once: about {need / 1e9:.1f} GB (the model "
                         f"compressed to keep {keep:g}, plus {extra} bytes per factor weight to train it), more than "
                         f"the {free_bytes / 1e9:.1f} GB free there; compress without --heal-steps (refinement "
                         "trains one block at a time) or heal on a larger GPU")


@torch.no_grad()
def teacher_targets(model: nn.Module, ids: torch.Tensor, *, top_k: int = TOP_K, batch_size: int = 4,
                    compute_dtype: str = "float32", progress: bool = False) -> TeacherTargets:
    """Record ``model``'s ``top_k`` next-token log-probabilities on ``ids`` (run it on the dense model).

    Args:
        model: a causal LM returning ``.logits``.
        ids: ``[windows, seq_len]`` token ids.
        top_k: tokens kept per position.
        batch_size: windows per forward pass.
        compute_dtype: dtype of the forward passes (:mod:`lowrank_infer.precision`); the
            log-probabilities are float32 either way.
        progress: show a progress bar.
    """
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"teacher targets need [windows, seq_len] token ids, got shape {list(ids.shape)}")
    device = next(model.parameters()).device
    logps, indices = [], []
    # One context: autocast keeps its weight casts while it lasts.
    with autocast(compute_dtype, device), steering_attention(model, compute_dtype):
        for start in tqdm(range(0, len(ids), batch_size), desc="dense targets", unit="batch", disable=not progress):
            logits = model(ids[start:start + batch_size].to(device), use_cache=False).logits
            logp, index = _top_log_probs(logits.reshape(-1, logits.shape[-1]), min(top_k, logits.shape[-1]))
            logps.append(logp.reshape(*logits.shape[:-1], -1).cpu())
            indices.append(index.reshape(*logits.shape[:-1], -1).to(torch.int32).cpu())
    return TeacherTargets(ids, torch.cat(logps), torch.cat(indices))


# Positions whose float32 log-probabilities are formed at once (25 MiB for SmolLM2's vocabulary),
# not a whole batch's (400 MiB for four 512-token windows). The ranking is taken on the logits as
# they come and the normalizer in log_softmax's one fused pass, rather than a top-k over a float32
# copy and a separate logsumexp pass.
_TARGET_ROWS = 128


def _top_log_probs(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` largest float32 log-probabilities of each row of ``logits`` and their tokens,
    a chunk of rows at a time. The ranking is that of the logits themselves, in their own dtype."""
    values, tokens = [], []
    for start in range(0, logits.shape[0], _TARGET_ROWS):
        chunk = logits[start:start + _TARGET_ROWS]
        index = chunk.topk(top_k, dim=-1).indices
        values.append(chunk.float().log_softmax(-1).gather(-1, index))
        tokens.append(index)
    return torch.cat(values), torch.cat(tokens)


def _kl(model: nn.Module, targets: TeacherTargets, device: torch.device, head: nn.Linear | None = None) -> torch.Tensor:
    """The healing loss of ``model`` on the windows of ``targets`` (:func:`~lowrank_infer.healing_loss.coarsened_kl`)."""
    return coarsened_kl(model, targets.ids.to(device), targets.logp.to(device), targets.index.to(device), head)


@torch.no_grad()
def _held_loss(model, held: TeacherTargets, device, batch_size: int, head: nn.Linear | None = None) -> float:
    losses = [_kl(model, held.batch(slice(s, s + batch_size)), device, head).item() * min(batch_size, len(held.ids) - s)
              for s in range(0, len(held.ids), batch_size)]
    return sum(losses) / len(held.ids)


def _factors(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LowRankLinear) and not m.is_dense for p in (m.U, m.V)]


def heal(model: nn.Module, train: TeacherTargets, held: TeacherTargets, config: HealConfig, *,
         progress: bool = False) -> HealReport:
    """Distill ``model``'s low-rank factors toward the dense targets, in place (see the module docstring).

    Args:
        model: a compressed model (its ``LowRankLinear`` factors train; nothing else does).
        train: dense targets of the training windows (:func:`teacher_targets` before compression).
        held: dense targets of held-out windows, for early stopping only.
        config: steps, learning rate, batch size, evaluation cadence.
        progress: show a progress bar.

    Returns:
        What ran and what it gained on the held-out windows.

    Raises:
        ValueError: the model has no low-rank layer, or a loss is not finite (the factors are
            then restored to what they were before healing).
    """
    factors = _factors(model)
    if not factors:
        raise ValueError("heal: the model has no low-rank layer to train")
    device = factors[0].device
    start = time.perf_counter()
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        trained = {id(p) for p in factors}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        model.eval()  # no dropout: the dense targets were made without it
        head = fusable_head(model, held.ids[:1, :8])
        if head is not None:
            head = frozen_copy(head, config.compute_dtype)
        windows = len(train.ids)

        def train_loss(step: int) -> torch.Tensor:
            first = ((step - 1) * config.batch_size) % windows
            return _kl(model, train.batch(slice(first, first + config.batch_size)), device, head)

        with (frozen_weights_cast(model, config.compute_dtype, (nn.Linear, LowRankLinear)),
              steering_attention(model, config.compute_dtype)):
            result = train_early_stopped(factors, train_loss, lambda: _held_loss(model, held, device, config.batch_size, head),
                                         config, progress=progress)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return HealReport(**dataclasses.asdict(result), seconds=time.perf_counter() - start)
