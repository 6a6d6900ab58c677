"""Block refinement: one block's linears trained briefly to reproduce the dense block.

The closed form of :mod:`lowrank_infer.compensation` fits every linear on its own; the block's
nonlinearities (softmax, SiLU, the products of gated MLPs) are left out of it. A few Adam steps on
all of one block's factors at once, with the loss the block really has — the squared distance
between its output on the compressed stream and the dense block's output on the dense stream,
relative to the dense output's energy — recover part of what the per-layer fits miss (the idea
of AA-SVD's block refinement). Steps run on calibration batches; held-out windows (never fitted,
never trained on) decide when to stop, and the factors that scored best there are kept, the
closed-form ones included, so a block never leaves refinement worse on them.

The layers the plan keeps dense train too (their weights, from the dense model's): they add no
parameter and can absorb part of the error of the factors beside them. On SmolLM2 at keep 0.8,
where ARA keeps 93 of 210 layers dense, the healed model's held-out KL fell from 0.3363 to 0.3328
(``benchmarks/results/quality_smollm2_v18_dense_refined.json`` against ``v17_heal250_heap``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_infer.calibration import run_block
from lowrank_infer.cpu_attention import steering_attention
from lowrank_infer.training import EarlyStopped, Schedule, train_early_stopped

__all__ = ["BlockBatches", "Factored", "KeptDense", "RefineConfig", "refine_block"]


@dataclass(frozen=True)
class RefineConfig(Schedule):
    """Settings of :func:`refine_block`, per block (see :class:`~lowrank_infer.training.Schedule`):
    each step takes one calibration batch of ``batch_size`` windows (the batch of the whole
    block-by-block run); 4 steps between held-out scores, 2 scores of patience."""

    eval_every: int = 4
    patience: int = 2

    what: ClassVar[str] = "refine"


class Factored(nn.Module):
    """``y = U (Vᵀ x) + b`` with trainable float32 ``U``, ``V``: what ``LowRankLinear`` computes,
    standing in for a dense linear while its block is fitted."""

    def __init__(self, linear: nn.Linear, U: torch.Tensor, V: torch.Tensor):
        super().__init__()
        device = linear.weight.device
        self.U = nn.Parameter(U.detach().to(device, torch.float32).contiguous())
        self.V = nn.Parameter(V.detach().to(device, torch.float32).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V.T.to(x.dtype)), self.U.to(x.dtype), self.bias)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.U.detach().float().cpu(), self.V.detach().float().cpu()


class KeptDense(nn.Module):
    """``y = W x + b`` with a trainable float32 copy of ``W``: a layer the plan keeps dense,
    standing in for it while its block is refined (it trains with the factors, its size unchanged)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.dtype = linear.weight.dtype
        self.weight = nn.Parameter(linear.weight.detach().to(torch.float32).clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def trained(self) -> torch.Tensor:
        """The weight in the layer's own dtype, on the CPU."""
        return self.weight.detach().to(self.dtype).cpu()


@dataclass(frozen=True)
class BlockBatches:
    """A block's recorded calls, its inputs on the compressed stream and the dense block's
    outputs, one entry per batch."""

    calls: Sequence
    inputs: Sequence[torch.Tensor]
    targets: Sequence[torch.Tensor]

    def __post_init__(self) -> None:
        if not (len(self.calls) == len(self.inputs) == len(self.targets)) or not self.calls:
            raise ValueError("block refinement needs at least one batch of calls, inputs and targets, equally many")


def _relative_error(block: nn.Module, data: BlockBatches, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    (out,) = run_block(block, [data.calls[index]], [data.inputs[index]])
    target = data.targets[index].to(out.device, torch.float32)
    return (out.float() - target).square().sum(), target.square().sum()


def _held_error(block: nn.Module, held: BlockBatches) -> float:
    with torch.no_grad():
        errors = [_relative_error(block, held, b) for b in range(len(held.calls))]
    return float(sum(e for e, _ in errors) / sum(t for _, t in errors))


def refine_block(
    block: nn.Module, factored: Mapping[str, Factored | KeptDense], fit: BlockBatches, held: BlockBatches,
    config: RefineConfig
) -> EarlyStopped:
    """Train the ``factored`` layers of ``block`` (already swapped in; ``KeptDense`` ones too)
    toward ``fit.targets``, in place, stopping on ``held`` (see the module docstring). Losses are
    squared errors relative to the dense outputs' energy.

    Raises:
        ValueError: no factors to train, or a loss is not finite (the factors are then back at
            their closed-form values).
    """
    params = [p for layer in factored.values() for p in layer.parameters()]
    if not params:
        raise ValueError("block refinement: the block has no low-rank layer to train")
    trained = {id(p) for p in params}
    flags = {p: p.requires_grad for p in block.parameters()}

    def train_loss(step: int) -> torch.Tensor:
        error, energy = _relative_error(block, fit, (step - 1) % len(fit.calls))
        return error / energy

    try:
        for p in block.parameters():
            p.requires_grad_(id(p) in trained)
        with torch.enable_grad(), steering_attention(block, config.compute_dtype):
            return train_early_stopped(params, train_loss, lambda: _held_error(block, held), config)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
