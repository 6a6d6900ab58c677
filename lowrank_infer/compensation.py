"""Error-compensating factors: each linear refitted on the inputs the compressed model feeds it.

Whitened SVD fits every layer to the dense model's inputs, yet once earlier layers are cut the
layer sees other inputs, and the errors add up with depth. Here the blocks run twice over the
calibration batches, block by block: a dense stream (the original model) and a compressed
stream (every layer before this one already replaced). A layer with weight ``W`` and rank ``k``
from the plan gets the rank-``k`` ``A`` that best maps its compressed-stream inputs ``X̃`` to the
dense layer's outputs ``X W ᵀ``, with a ridge toward ``W``:

    min_A ‖X Wᵀ − X̃ Aᵀ‖² + λ·s·‖A − W‖²,   s = median(diag(X̃ᵀX̃))

In closed form ``A* = W (XᵀX̃ + λsI) M⁻¹`` with ``M = X̃ᵀX̃ + λsI`` is the unconstrained optimum,
and the best rank ``k`` in the same metric is the whitened SVD of ``A*`` under ``M``. On the first
layer of block 0 the two streams agree and this is SVD-LLM's whitened SVD. Layers that read one
tensor (q/k/v, gate/up) are refitted together, in the order the block runs them, so that each
group sees the outputs of the groups before it already compressed. The median keeps a few
massive-activation features from setting the ridge's scale.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_infer.allocation.plan import RankPlan
from lowrank_infer.calibration import block_linears, block_on, block_stream, run_block
from lowrank_infer.factorize import whitened_svd
from lowrank_infer.structure import replace_module, target_linears

__all__ = ["compensated_factors", "refit"]


def refit(
    weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, rank: int, *, ridge: float, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` of the rank-``rank`` ``A`` minimizing ``‖X Wᵀ − X̃ Aᵀ‖² + λ·s·‖A − W‖²``.

    Args:
        weight: ``[m, n]`` dense weight ``W``.
        gram: ``[n, n]`` ``X̃ᵀX̃`` of the compressed-stream inputs.
        cross: ``[n, n]`` ``XᵀX̃`` (dense-stream inputs times compressed-stream inputs, same tokens).
        rank: the plan's rank.
        ridge: ``λ`` relative to ``s = median(diag(X̃ᵀX̃))``; must be > 0.
        name: for error messages.
    """
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    W = weight.detach().to(torch.float64)
    gram, cross = gram.to(W.device, torch.float64), cross.to(W.device, torch.float64)
    shift = ridge * float(gram.diagonal().median()) * torch.eye(gram.shape[0], dtype=torch.float64, device=W.device)
    metric = gram + shift
    # A* = W (XᵀX̃ + λsI) M⁻¹, solved as M A*ᵀ = (XᵀX̃ + λsI)ᵀ Wᵀ (M is symmetric).
    best = torch.linalg.solve(metric, (cross + shift).T @ W.T).T
    return whitened_svd(best, metric, max_rank=rank, name=name).factors(rank)


class _StopBlock(Exception):
    """Raised by a hook once the inputs it waits for are captured: the rest of the block is not needed."""


class _GroupCapture:
    """Forward pre-hooks that find the next group of layers to refit (the first of ``pending`` to
    run, with every pending layer reading the same tensor) and hand its input to ``collect``."""

    def __init__(self, pending: Mapping[str, nn.Module], collect):
        self.pending, self.collect = pending, collect
        self.group: list[str] = []
        self._input: torch.Tensor | None = None

    def start_batch(self, batch: int) -> None:
        self.batch, self._input = batch, None

    def hook_for(self, name: str):
        def hook(_module, args):
            x = args[0]
            if self._input is None:
                self._input = x
                self.collect(self.batch, name, x)
            elif x is not self._input:
                raise _StopBlock  # the group is complete: a layer with another input runs now
            if self.batch == 0 and name not in self.group:
                self.group.append(name)

        return hook

    def run(self, block: nn.Module, calls: list, hidden: list) -> list[str]:
        handles = [m.register_forward_pre_hook(self.hook_for(n)) for n, m in self.pending.items()]
        try:
            for b, ((args, kwargs), states) in enumerate(zip(calls, hidden)):
                self.start_batch(b)
                try:
                    run_block(block, [(args, kwargs)], [states])
                except _StopBlock:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        return self.group


def _dense_inputs(block: nn.Module, calls: list, hidden: list, linears: Mapping[str, nn.Module]):
    """The dense block's outputs, and each planned layer's input per batch (kept once per tensor)."""
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linears}

    def keeper(name):
        def hook(_module, args):
            inputs[name].append(args[0].detach())

        return hook

    handles = [m.register_forward_pre_hook(keeper(n)) for n, m in linears.items()]
    try:
        outputs = run_block(block, calls, hidden)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, inputs


def _lowrank_linear(linear: nn.Linear, U: torch.Tensor, V: torch.Tensor) -> nn.Linear:
    """A plain linear holding ``U Vᵀ``: what the compressed layer computes, for the compressed stream."""
    new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(U.to(new.weight) @ V.to(new.weight).T)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def _refit_block(block, calls, dense_hidden, comp_hidden, planned, plan, ridge, prefix_of):
    """Refit every planned layer of one block, group by group; returns factors and both streams' outputs."""
    dense_out, dense_in = _dense_inputs(block, calls, dense_hidden, planned)
    pending, factors, swapped = dict(planned), {}, {}
    try:
        while pending:
            stats = {}

            def collect(batch, name, x):
                xd = dense_in[name][batch].reshape(-1, x.shape[-1]).to(torch.float64)
                xc = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                stats["gram"] = stats.get("gram", 0) + xc.T @ xc
                stats["cross"] = stats.get("cross", 0) + xd.T @ xc

            group = _GroupCapture(pending, collect).run(block, calls, comp_hidden)
            if not group:
                raise ValueError(f"layers {sorted(pending)[:3]} never ran in the forward pass")
            for name in group:
                linear = pending.pop(name)
                U, V = refit(linear.weight, stats["gram"], stats["cross"], plan[prefix_of(name)].rank,
                             ridge=ridge, name=prefix_of(name))
                factors[prefix_of(name)] = (U.float().cpu(), V.float().cpu())
                swapped[name] = linear
                replace_module(block, name, _lowrank_linear(linear, U, V))
        comp_out = run_block(block, calls, comp_hidden)
    finally:
        for name, linear in swapped.items():
            replace_module(block, name, linear)
    return factors, dense_out, comp_out


@torch.no_grad()
def compensated_factors(
    model: nn.Module,
    plan: RankPlan,
    input_ids: torch.Tensor,
    *,
    ridge: float = 1e-2,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Factors ``(U, V)`` (float32, CPU) of every low-rank layer of ``plan``, refitted block by
    block on the compressed stream (see the module docstring). The model is left unchanged.

    Args:
        model: the dense model the plan was made for.
        plan: ranks per layer (dense layers keep their weights and are not refitted).
        input_ids: ``[samples, seq_len]`` calibration token ids.
        ridge: strength of the pull toward the dense weight, relative to the median input energy.
        batch_size: samples per forward pass.
        device: where each block runs (default: where the model's parameters are).
        progress: show a progress bar over blocks.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    linears = target_linears(model)
    plan.validate({name: (m.out_features, m.in_features) for name, m in linears.items()})
    lowrank = {layer.name: linears[layer.name] for layer in plan.layers if layer.rank is not None}
    factors = {}
    with block_stream(model, input_ids, batch_size=batch_size, device=device) as stream:
        dense_hidden = comp_hidden = stream.hidden
        for i, block in enumerate(tqdm(stream.blocks, desc="compensation", unit="block", disable=not progress)):
            prefix = f"{stream.prefix}.{i}."
            planned = {name.removeprefix(prefix): m for name, m in block_linears(lowrank, stream.prefix, i).items()}
            with block_on(block, device):
                found, dense_hidden, comp_hidden = _refit_block(
                    block, stream.calls[i], dense_hidden, comp_hidden, planned, plan, ridge, lambda n: prefix + n)
            factors.update(found)
    return factors
