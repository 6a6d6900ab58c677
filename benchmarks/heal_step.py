"""Seconds per healing step (forward and backward of one batch of windows), the loss fused through
the output layer (lowrank_infer.healing_loss) against the plain path (the vocabulary-wide logits
under autograd), side by side on one compressed checkpoint: the two alternate, medians reported.

Timing only: the windows are random token ids and the targets the checkpoint's own top-64
distributions at a higher temperature (the work per step does not depend on the text).

usage: python benchmarks/heal_step.py CHECKPOINT [--rounds 8] [--seq-len 512] [--batch 1]
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

from lowrank_infer.bench.output import environment
from lowrank_infer.healing import _factors
from lowrank_infer.healing_loss import coarsened_kl, fusable_head
from lowrank_infer.io import load_compressed
from lowrank_infer.precision import autocast, check_compute_dtype


def _targets(model, ids, compute_dtype):
    with torch.no_grad(), autocast(compute_dtype, ids.device):
        logp = (model(ids, use_cache=False).logits.float() / 2).log_softmax(-1)
    top = logp.topk(64, dim=-1)
    return top.values, top.indices


def _step(model, ids, logp, index, head, compute_dtype) -> tuple[float, float]:
    start = time.perf_counter()
    with autocast(compute_dtype, ids.device):
        loss = coarsened_kl(model, ids, logp, index, head)
    loss.backward()
    for p in _factors(model):
        p.grad = None
    return time.perf_counter() - start, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a compressed checkpoint")
    parser.add_argument("--rounds", type=int, default=8, help="steps per path (after one warm-up step each)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="windows per step")
    parser.add_argument("--compute-dtype", default="bfloat16")
    args = parser.parse_args()
    check_compute_dtype(args.compute_dtype)
    print("command: python benchmarks/heal_step.py " + shlex.join(sys.argv[1:]))
    print(f"machine: {environment(torch.device('cpu'))['device_label']}, {torch.get_num_threads()} threads")
    model = load_compressed(args.checkpoint, pack=False).eval()
    factors = {id(p) for p in _factors(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in factors)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    logp, index = _targets(model, ids, args.compute_dtype)
    head = fusable_head(model, ids[:1, :8])
    if head is None:
        raise SystemExit("this model's logits are not its output layer's: healing uses the plain path only")
    paths = {"plain": None, "fused": head}
    times = {name: [] for name in paths}
    losses = {}
    for round_ in range(args.rounds + 1):
        for name, path_head in paths.items():
            seconds, losses[name] = _step(model, ids, logp, index, path_head, args.compute_dtype)
            if round_:  # the first round warms up
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in paths:
        print(f"{name}: {median[name]:.3f} s a step (median of {args.rounds}), loss {losses[name]:.6f}")
    print(f"plain / fused: {median['plain'] / median['fused']:.2f}x")


if __name__ == "__main__":
    main()
