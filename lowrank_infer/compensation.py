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
massive-activation features from setting the ridge's scale. Layers the plan keeps dense keep
their weights here; block refinement, when asked for, trains them with the factors.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_infer.allocation.plan import RankPlan
from lowrank_infer.calibration import block_linears, block_stream, module_on, run_block, symmetric_gram
from lowrank_infer.cpu_attention import steering_attention
from lowrank_infer.factorize import whitened_svd
from lowrank_infer.precision import autocast
from lowrank_infer.refinement import BlockBatches, Factored, KeptDense, RefineConfig, refine_block
from lowrank_infer.structure import replace_module, target_linears
from lowrank_infer.training import EarlyStopped

__all__ = ["Compensated", "compensated_factors", "refit"]


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


@contextmanager
def _stream_precision(block: nn.Module, refine: RefineConfig | None, initial) -> Iterator[None]:
    """Both streams in refinement's compute dtype where they only steer it (the factors given, no
    closed form fitted on them; :mod:`lowrank_infer.precision`), else in the model's own."""
    if refine is None or initial is None:
        yield
        return
    dtype = refine.compute_dtype
    with autocast(dtype, next(block.parameters()).device), steering_attention(block, dtype):
        yield


def _refit_block(block, calls, dense_hidden, comp_hidden, planned, kept, plan, ridge, prefix_of, fit_batches, refine,
                 initial):
    """Refit every planned layer of one block, group by group, on the first ``fit_batches``
    batches (or start from ``initial``'s factors), then refine the block (when ``refine``: its
    ``kept`` dense layers too) stopping on the rest; returns the factors, the refined dense
    weights, the refinement's report and both streams' outputs."""
    # Starting from given factors, no closed form needs the dense layers' inputs.
    with _stream_precision(block, refine, initial):
        dense_out, dense_in = _dense_inputs(block, calls, dense_hidden, {} if initial is not None else planned)
    pending, factored, swapped, report = dict(planned), {}, {}, None
    try:
        if initial is not None:
            for name in list(pending):
                linear = swapped[name] = pending.pop(name)
                factored[name] = Factored(linear, *initial(prefix_of(name)))
                replace_module(block, name, factored[name])
        while pending:
            stats = {}

            def collect(batch, name, x):
                xd = dense_in[name][batch].reshape(-1, x.shape[-1]).to(torch.float64)
                xc = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                stats["gram"] = stats.get("gram", 0) + symmetric_gram(xc)
                stats["cross"] = stats.get("cross", 0) + xd.T @ xc

            group = _GroupCapture(pending, collect).run(block, calls[:fit_batches], comp_hidden[:fit_batches])
            if not group:
                raise ValueError(f"layers {sorted(pending)[:3]} never ran in the forward pass")
            for name in group:
                linear = swapped[name] = pending.pop(name)
                U, V = refit(linear.weight, stats["gram"], stats["cross"], plan[prefix_of(name)].rank,
                             ridge=ridge, name=prefix_of(name))
                factored[name] = Factored(linear, U, V)
                replace_module(block, name, factored[name])
        if refine is not None and factored:
            for name, linear in kept.items():
                swapped[name], factored[name] = linear, KeptDense(linear)
                replace_module(block, name, factored[name])
            fit = BlockBatches(calls[:fit_batches], comp_hidden[:fit_batches], dense_out[:fit_batches])
            held = BlockBatches(calls[fit_batches:], comp_hidden[fit_batches:], dense_out[fit_batches:])
            report = refine_block(block, factored, fit, held, refine)
        with _stream_precision(block, refine, initial):
            comp_out = run_block(block, calls, comp_hidden)
    finally:
        for name, linear in swapped.items():
            replace_module(block, name, linear)
    factors = {prefix_of(name): layer.factors() for name, layer in factored.items() if name not in kept}
    weights = {prefix_of(name): factored[name].trained() for name in kept if name in factored}
    return factors, weights, report, dense_out, comp_out


@dataclass
class Compensated:
    """What :func:`compensated_factors` found: ``factors[name] = (U, V)`` (float32, CPU) for every
    low-rank layer of the plan, per block (in order) its refinement's report (None: not refined),
    and ``weights[name]`` (CPU, the layer's dtype) for every layer the plan keeps dense in a
    refined block."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    refined: list[EarlyStopped | None]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


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
    refine: RefineConfig | None = None,
    held_ids: torch.Tensor | None = None,
    initial: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Compensated:
    """Factors of every low-rank layer of ``plan``, refitted block by block on the compressed
    stream (see the module docstring), each block then refined when ``refine`` is given (see
    :mod:`lowrank_infer.refinement`), the layers the plan keeps dense with it. The model is left
    unchanged.

    Args:
        model: the dense model the plan was made for.
        plan: ranks per layer (dense layers keep their weights and are not refitted).
        input_ids: ``[samples, seq_len]`` calibration token ids (the fits, and refinement's steps).
        ridge: strength of the pull toward the dense weight, relative to the median input energy.
        batch_size: samples per forward pass (with ``refine``, its ``batch_size`` instead).
        device: where each block runs (default: where the model's parameters are).
        progress: show a progress bar over blocks.
        refine: block refinement's settings (default: none).
        held_ids: ``[samples, seq_len]`` held-out token ids on which refinement stops; needed
            with ``refine``, never fitted or trained on.
        initial: ``name -> (U, V)``: skip the closed form and start each layer (refinement, when
            given) from these factors, e.g. the plan's own whitened SVD.
    """
    if refine is not None and held_ids is None:
        raise ValueError("block refinement stops on held-out windows: pass held_ids")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    linears = target_linears(model)
    plan.validate({name: (m.out_features, m.in_features) for name, m in linears.items()})
    lowrank = {layer.name: linears[layer.name] for layer in plan.layers if layer.rank is not None}
    kept = {} if refine is None else {layer.name: linears[layer.name] for layer in plan.layers if layer.rank is None}
    if refine is not None:
        batch_size = refine.batch_size
        if held_ids.ndim != 2 or held_ids.shape[1] != input_ids.shape[1] or not len(held_ids):
            raise ValueError(f"held_ids must be [samples, {input_ids.shape[1]}] like the calibration ids, "
                             f"got {tuple(held_ids.shape)}")
    fit_batches = len(input_ids.split(batch_size))
    found = Compensated({}, [])
    with block_stream(model, input_ids, batch_size=batch_size, device=device,
                      held_ids=None if refine is None else held_ids.to(input_ids)) as stream:
        dense_hidden = comp_hidden = stream.hidden
        bar = tqdm(stream.blocks, desc="compensation", unit="block", disable=not progress)
        for i, block in enumerate(bar):
            prefix = f"{stream.prefix}.{i}."
            planned = {name.removeprefix(prefix): m for name, m in block_linears(lowrank, stream.prefix, i).items()}
            dense = {name.removeprefix(prefix): m for name, m in block_linears(kept, stream.prefix, i).items()}
            with module_on(block, device):
                factors, weights, report, dense_hidden, comp_hidden = _refit_block(
                    block, stream.calls[i], dense_hidden, comp_hidden, planned, dense, plan, ridge,
                    lambda n: prefix + n, fit_batches, refine, initial)
            found.factors.update(factors)
            found.weights.update(weights)
            found.refined.append(report)
            if report is not None:
                bar.set_postfix(held=f"{report.held_before:.3g}->{report.held_after:.3g}")
    return found
