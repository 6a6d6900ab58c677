"""Every target linear's spectrum, one decoder block at a time, in one process or several.

A block is calibrated (each rank on its share of the windows, the statistics summed over
ranks), each of its linears is factorized on one owner rank and sent to the others, and the
block's statistics are dropped before the next block runs. With a work directory each finished
block's spectra go to disk and finished blocks are skipped on a resume.
"""

from __future__ import annotations

import time
from typing import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_infer.calibration import block_grams, block_linears, block_stream, module_on
from lowrank_infer.distributed import Ranks
from lowrank_infer.factorize import AUTO, Spectrum, held_out_shrinkage, plain_svd, whitened_svd
from lowrank_infer.structure import decoder_blocks

__all__ = ["spectra_everywhere", "stream_spectra"]


def _factorize(linear: nn.Linear, gram: torch.Tensor | None, cap: int, device, name: str, shrinkage: float | str,
               judge_rank: int | None) -> Spectrum:
    """Whitened (``gram`` given, shrunk by ``shrinkage``) or plain SVD of one linear, factors kept
    up to ``cap``. With ``shrinkage="auto"`` the Gram comes in two folds and the strength is the
    one whose factors at ``judge_rank`` generalize best between them (none without a rank)."""
    weight = linear.weight.to(device) if device is not None else linear.weight
    if gram is None:
        return plain_svd(weight, max_rank=cap, name=name)
    gram = gram.to(weight.device)
    if shrinkage == AUTO:
        shrinkage = held_out_shrinkage(weight, (gram[0], gram[1]), judge_rank, name=name) if judge_rank else 0.0
        gram = gram[0] + gram[1]
    return whitened_svd(weight, gram, max_rank=cap, shrinkage=shrinkage, name=name)


def _block_spectra(linears: Mapping[str, nn.Linear], grams, caps, device, ranks: Ranks, shrinkage: float | str,
                   judge_ranks: Mapping[str, int | None]) -> dict[str, Spectrum]:
    """Spectra of one block's linears: each factorized by its owner rank, then sent to all."""
    found = {}
    for j, (name, linear) in enumerate(linears.items()):
        owner = ranks.owner(j)
        gram = None if grams is None else grams[name]
        if ranks.rank == owner:
            spectrum = _factorize(linear, gram, caps[name], device, name, shrinkage, judge_ranks.get(name))
        else:
            spectrum = Spectrum.empty(linear.out_features, linear.in_features, caps[name], whitened=gram is not None)
        found[name] = _broadcast_spectrum(spectrum, owner, ranks)
    return found


def _broadcast_spectrum(spectrum: Spectrum, src: int, ranks: Ranks) -> Spectrum:
    if ranks.world == 1:
        return spectrum
    strength = torch.tensor([spectrum.shrinkage], dtype=torch.float64)
    sigma, left, right, strength = (ranks.broadcast(t.contiguous(), src)
                                    for t in (spectrum.sigma, spectrum.left, spectrum.right, strength))
    return Spectrum(sigma, left, right, spectrum.whitened, float(strength))


@torch.no_grad()
def stream_spectra(model, linears, caps, *, calib_ids, whiten, batch_size, device, work, ranks, seconds, progress,
                   shrinkage=0.0, judge_ranks=None):
    """Every linear's spectrum, one decoder block at a time: calibrate the block (each rank on
    its share of the windows, statistics summed), factorize its linears, drop its statistics.
    With a work directory each finished block goes to disk (and finished blocks are skipped);
    else rank 0 keeps the spectra in memory. ``shrinkage`` pulls each Gram toward a scaled
    identity before whitening (:func:`~lowrank_infer.factorize.shrink_gram`); ``"auto"`` chooses
    each layer's strength by cross-validation at its rank in ``judge_ranks``
    (:func:`~lowrank_infer.factorize.held_out_shrinkage`)."""
    judge_ranks = judge_ranks or {}
    prefix, blocks = decoder_blocks(model)
    start = work.blocks_done if work is not None else 0
    # Blocks after the last one that holds a target linear need not run.
    last = max(i for i in range(len(blocks)) if block_linears(linears, prefix, i))
    todo = range(start, last + 1)
    kept: dict[str, Spectrum] = {}
    bar = tqdm(total=last + 1, initial=start, desc="analyze", unit="block", disable=not (progress and ranks.main))

    def finish(i, grams, hidden=None):
        began = time.perf_counter()
        found = _block_spectra(block_linears(linears, prefix, i), grams, caps, device, ranks, shrinkage, judge_ranks)
        seconds["factorization"] = seconds.get("factorization", 0.0) + time.perf_counter() - began
        if work is not None:
            if hidden is not None and i < last:
                work.save_hidden(i + 1, hidden)
            work.finish_block(i, found)
        elif ranks.main:
            kept.update(found)
        bar.update()

    began = time.perf_counter()
    with bar:  # closed before an error propagates, so the error is the last line printed
        if not whiten:
            for i in todo:
                with module_on(blocks[i], device):  # weights kept on disk are read in for the SVDs
                    finish(i, None)
        elif todo:
            with block_stream(model, ranks.shard(calib_ids), batch_size=batch_size, device=device) as stream:
                hidden = work.load_hidden(start) if start else None
                for i, grams, hidden in block_grams(stream, linears, device=device, blocks=todo, hidden=hidden,
                                                    folds=shrinkage == AUTO):
                    for gram in {id(g): g for g in grams.values()}.values():  # shared statistics once
                        ranks.all_reduce_sum(gram)
                    finish(i, grams, hidden)
            seconds["calibration"] = time.perf_counter() - began - seconds.get("factorization", 0.0)
    spectra = work.spectra() if work is not None and ranks.main else kept
    return {name: spectra[name] for name in linears} if ranks.main else {}


def spectra_everywhere(spectra, linears, ranks: Ranks) -> dict[str, Spectrum]:
    """Rank 0's spectra, factors in memory, on every rank (for allocators that train on every rank)."""
    meta = ranks.broadcast_object({n: (s.max_rank, s.whitened) for n, s in spectra.items()} if ranks.main else None)
    out = {}
    for name, linear in linears.items():
        cap, whitened = meta[name]
        if ranks.main:  # a stored spectrum's factors are read from disk here, once
            mine = Spectrum(spectra[name].sigma, spectra[name].left, spectra[name].right, whitened, spectra[name].shrinkage)
        else:
            mine = Spectrum.empty(linear.out_features, linear.in_features, cap, whitened=whitened)
        out[name] = _broadcast_spectrum(mine, 0, ranks)
    return out
