"""Calibration statistics: float64 ``XᵀX`` of every target linear's inputs, one block at a time.

One pass with stand-ins for the decoder blocks records every block's call: block 0's hidden
states, and each block's own attention mask and position embeddings (models that mix
sliding-window and full-attention layers give each layer type its own). Then each block is
moved to the compute device, run on the cached hidden states with hooks on its linears, and
its outputs become the next block's inputs. Peak device memory is one block plus the cached
hidden states and one block's statistics. Linears that read the same tensor (q/k/v, gate/up)
share one statistic.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

import lowrank_infer.offload as offload
from lowrank_infer.structure import decoder_blocks

__all__ = ["BlockStream", "block_grams", "block_linears", "block_stream", "calibrate", "module_on", "run_block",
           "symmetric_gram"]

# XᵀX is symmetric, so only its upper triangle is multiplied out, one band of rows at a time, and
# mirrored: with 4 bands 5/8 of a full product's work (float64 on 2 EPYC cores, 16,384 tokens:
# 0.514 s against 0.755 s at 1536 features, 0.078 s against 0.103 s at 576; 8 bands were slower
# at 576; benchmarks/results/cpu/gram_speed_epyc.txt).
_GRAM_BANDS = 4


def symmetric_gram(x: torch.Tensor, bands: int = _GRAM_BANDS) -> torch.Tensor:
    """``xᵀx`` of ``[tokens, n]`` ``x`` in its dtype, exactly symmetric: each entry is the same
    dot product over the tokens as in ``x.T @ x``, computed once for both triangles, ``bands``
    row blocks at a time."""
    n = x.shape[-1]
    edges = [n * i // bands for i in range(bands + 1)]
    out = x.new_empty(n, n)
    for lo, hi in zip(edges, edges[1:]):
        if lo == hi:
            continue
        band = x[:, lo:hi].T @ x[:, lo:]
        diagonal = band[:, :hi - lo].triu()  # a product's own diagonal block need not be symmetric
        out[lo:hi, lo:hi] = diagonal + diagonal.triu(1).T
        out[lo:hi, hi:] = band[:, hi - lo:]
        out[hi:, lo:hi] = band[:, hi - lo:].T
    return out


class _StopForward(Exception):
    """Raised by the last block's stand-in once every block's call is recorded."""


class _CallRecorder(nn.Module):
    """Stands in for a decoder block: records ``(args, kwargs)`` of each call and passes the
    hidden states through unchanged (the model's per-layer arguments do not depend on them).
    Other attributes are the block's, for models that read e.g. ``layer.attention_type``."""

    def __init__(self, block: nn.Module, calls: list, last: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not registered: model.to() must not move it
        self.calls, self.last = calls, last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.last:
            raise _StopForward
        return args[0] if args else kwargs["hidden_states"]


def _record_block_calls(model: nn.Module, blocks: nn.ModuleList, batches, device) -> list[list]:
    """``calls[i][b]`` = ``(args, kwargs)`` with which block ``i`` is called on batch ``b``."""
    originals = list(blocks)
    calls: list[list] = [[] for _ in originals]
    for i, block in enumerate(originals):
        blocks[i] = _CallRecorder(block, calls[i], last=i == len(originals) - 1)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return calls


class _GramCollector:
    """Forward pre-hooks that add ``xᵀx`` (float64) of each linear's input into shared buffers;
    with ``folds``, one ``[2, n, n]`` buffer: windows of even and of odd index apart."""

    def __init__(self, linears: Mapping[str, nn.Linear], stat_device: torch.device, folds: bool = False):
        self.linears = linears
        self.stat_device = stat_device
        self.folds = folds
        self.grams: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}  # linear name -> owner of the statistic it shares
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._windows = self._batch_windows = 0  # windows before this batch, and in it

    def start_batch(self) -> None:
        # Keeping the input tensors alive until the batch ends guarantees that an equal
        # (pointer, shape, stride) key means the same tensor, not a reused address.
        self._seen = {}
        self._windows += self._batch_windows
        self._batch_windows = 0

    def _gram(self, x: torch.Tensor) -> torch.Tensor:
        if not self.folds:
            return symmetric_gram(x.detach().reshape(-1, x.shape[-1]).to(torch.float64))
        windows = x.detach().reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x.detach()[None]
        self._batch_windows = windows.shape[0]
        odd = (self._windows + torch.arange(windows.shape[0], device=x.device)) % 2 == 1
        flats = [windows[odd == fold].reshape(-1, x.shape[-1]).to(torch.float64) for fold in (False, True)]
        return torch.stack([symmetric_gram(flat) for flat in flats])

    def hook_for(self, name: str):
        def hook(_module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            owner = self._seen.get(key)
            if owner is not None:
                self.alias[name] = owner[0]
                return
            self._seen[key] = (name, x)
            gram = self._gram(x).to(self.stat_device)
            if name in self.grams:
                self.grams[name] += gram
            else:
                self.grams[name] = gram

        return hook

    @contextmanager
    def hooked(self) -> Iterator[None]:
        """The hooks on every linear for the ``with`` block."""
        handles = [m.register_forward_pre_hook(self.hook_for(n)) for n, m in self.linears.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def results(self) -> dict[str, torch.Tensor]:
        out = dict(self.grams)
        for name, owner in self.alias.items():
            out[name] = self.grams[owner]
        missing = [n for n in self.linears if n not in out]
        if missing:
            raise ValueError(f"calibration never reached {missing[0]} (is it used in the forward pass?)")
        return {name: out[name] for name in self.linears}


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockStream:
    """The decoder blocks, how each is called, and block 0's hidden states, per batch.

    ``calls[i][b]`` = ``(args, kwargs)`` with which block ``i`` is called on batch ``b``;
    ``hidden[b]`` = block 0's input hidden states of batch ``b``.
    """

    prefix: str
    blocks: nn.ModuleList
    calls: list[list]
    hidden: list[torch.Tensor]


@contextmanager
def block_stream(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int, device,
                 held_ids: torch.Tensor | None = None) -> Iterator[BlockStream]:
    """Everything but the decoder blocks on ``device`` for the ``with`` block (blocks move one at
    a time, see :func:`module_on`), and the recorded calls of every block; the model returns home
    afterwards. ``held_ids`` windows, when given, follow in batches of their own."""
    if input_ids.ndim != 2 or input_ids.numel() == 0:
        raise ValueError(f"calibration input_ids must be a non-empty [samples, seq_len] tensor, got {tuple(input_ids.shape)}")
    prefix, blocks = decoder_blocks(model)
    home = next(model.parameters()).device
    _move_all_but_blocks(model, blocks, device)
    try:
        batches = list(input_ids.split(batch_size)) + ([] if held_ids is None else list(held_ids.split(batch_size)))
        calls = _record_block_calls(model, blocks, batches, device)
        yield BlockStream(prefix, blocks, calls, [_hidden_of(args, kwargs) for args, kwargs in calls[0]])
    finally:
        _move_all_but_blocks(model, blocks, home)


@contextmanager
def module_on(module: nn.Module, device) -> Iterator[nn.Module]:
    """``module`` (a decoder block, or a whole model) on ``device`` for the ``with`` block, back
    where it was afterwards (a block whose weights are on disk is read in and dropped again)."""
    if offload.holds(module) and any(p.is_meta for p in module.parameters()):
        offload.load(module, device)
        try:
            yield module
        finally:
            offload.release(module)
        return
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def run_block(block: nn.Module, calls: list, hidden: list[torch.Tensor], before_batch=None) -> list[torch.Tensor]:
    """Run ``block`` with its recorded calls on ``hidden`` (one tensor per batch); its outputs.

    ``before_batch(b)`` is called before batch ``b`` runs (hooks keep per-batch state).
    """
    outputs = []
    for b, ((args, kwargs), states) in enumerate(zip(calls, hidden)):
        if before_batch is not None:
            before_batch(b)
        args, kwargs = _with_hidden(args, kwargs, states)
        outputs.append(_block_output(block(*args, **kwargs)))
    return outputs


def block_linears(linears: Mapping[str, nn.Module], prefix: str, index: int) -> dict[str, nn.Module]:
    """The entries of ``linears`` inside block ``index``."""
    return {n: m for n, m in linears.items() if n.startswith(f"{prefix}.{index}.")}


@torch.no_grad()
def calibrate(
    model: nn.Module,
    input_ids: torch.Tensor,
    linears: Mapping[str, nn.Linear],
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``XᵀX`` (float64, on the CPU) for each named linear, computed block by block.

    Args:
        model: a Hugging Face decoder-only model; its blocks may live on the CPU.
        input_ids: ``[samples, seq_len]`` calibration token ids.
        linears: name → module, all inside the decoder blocks (see ``target_linears``).
        batch_size: samples per forward pass.
        device: where each block runs (default: where the model's parameters are).
        progress: show a progress bar over blocks.

    Returns:
        name → ``[in_features, in_features]`` float64 sum of ``x xᵀ`` over all calibration tokens;
        linears that read the same input map to the same tensor object.
    """
    grams = {}
    device = _device_of(model, device)
    with block_stream(model, input_ids, batch_size=batch_size, device=device) as stream:
        blocks = tqdm(range(len(stream.blocks)), desc="calibration", unit="block", disable=not progress)
        for _, found, _ in block_grams(stream, linears, device=device, blocks=blocks):
            grams.update(found)
    missing = [n for n in linears if n not in grams]
    if missing:
        raise ValueError(f"calibration never reached {missing[0]} (is it inside a decoder block?)")
    return grams


@torch.no_grad()  # no autograd graph may link the blocks' outputs: it would hold every activation
def block_grams(
    stream: BlockStream,
    linears: Mapping[str, nn.Linear],
    *,
    device,
    blocks=None,
    hidden: list[torch.Tensor] | None = None,
    folds: bool = False,
) -> Iterator[tuple[int, dict[str, torch.Tensor], list[torch.Tensor]]]:
    """Block by block: ``(i, grams, outputs)``, block ``i``'s linears' ``XᵀX`` (float64, CPU;
    linears that read one tensor share one object) and its outputs, the next block's inputs.
    While the tuple is being handled the block is still on ``device``.

    Args:
        stream: from :func:`block_stream`.
        linears: name → module, all inside the decoder blocks.
        device: where each block runs.
        blocks: the block indices to run, in order (default: all); each block's inputs are the
            previous one's outputs.
        hidden: the inputs of the first of ``blocks`` (default: block 0's, from the stream).
        folds: each statistic ``[2, n, n]``: the windows of even and of odd index apart (their
            sum is ``XᵀX``), for choices cross-validated between the halves.

    Raises:
        ValueError: a linear of a block that its forward pass never reached.
    """
    hidden = stream.hidden if hidden is None else hidden
    for i in range(len(stream.blocks)) if blocks is None else blocks:
        block = stream.blocks[i]
        wanted = block_linears(linears, stream.prefix, i)
        collector = _GramCollector(wanted, torch.device("cpu"), folds=folds)
        with module_on(block, device):
            with collector.hooked():
                hidden = run_block(block, stream.calls[i], [h.to(device) for h in hidden],
                                   lambda _: collector.start_batch())
            # Still on the device (or read in from disk): the caller may factorize it now.
            yield i, collector.results(), hidden


def _device_of(model: nn.Module, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _move_all_but_blocks(model: nn.Module, blocks: nn.ModuleList, device) -> None:
    """``model.to(device)`` for everything except the decoder blocks (they move one at a time)."""
    originals = list(blocks)
    for i in range(len(blocks)):
        blocks[i] = nn.Module()
    try:
        model.to(device)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same call with its hidden states replaced (passed positionally or by keyword)."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
