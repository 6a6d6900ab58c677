"""Seconds per healing step (forward and backward of one batch of windows), side by side on one
compressed checkpoint, four ways that alternate step by step (medians reported):

* ``plain``: the vocabulary-wide logits under autograd, the low-rank layers through the op's float32
  intermediate, every frozen weight cast by autocast at every step;
* ``fused``: the loss fused through the output layer (lowrank_infer.healing_loss), otherwise as ``plain``;
* ``healing, SDPA``: fused, the low-rank layers as two autocast linears (bfloat16 intermediate),
  frozen weights and output layer cast once, attention through PyTorch's SDPA;
* ``healing``: as :func:`lowrank_infer.healing.heal` runs a step: as ``healing, SDPA``, with the
  attention of :mod:`lowrank_infer.cpu_attention` where it applies (bfloat16 on a CPU).

Timing only: the windows are random token ids and the targets the checkpoint's own top-64
distributions at a higher temperature (the work per step does not depend on the text).

With ``--breakdown`` it then profiles ``healing`` steps (torch.profiler, self time per operator)
and prints the share of matrix products, attention and everything else, and the same for the
dense model's forward pass that records healing's targets (``--dense``): what a faster step would
have to shrink.

usage: python benchmarks/heal_step.py CHECKPOINT [--rounds 8] [--seq-len 512] [--batch 1] [--breakdown --dense MODEL]
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import lowrank_infer.kernels.lowrank_linear_op as lowrank_op
from lowrank_infer.bench.output import environment
from lowrank_infer.cpu_attention import steering_attention
from lowrank_infer.healing import _factors, teacher_targets
from lowrank_infer.healing_loss import coarsened_kl, frozen_copy, fusable_head
from lowrank_infer.io import load_compressed
from lowrank_infer.models import load_model
from lowrank_infer.module import LowRankLinear
from lowrank_infer.precision import autocast, check_compute_dtype, frozen_weights_cast


def _targets(model, ids, compute_dtype):
    with torch.no_grad(), autocast(compute_dtype, ids.device):
        logp = (model(ids, use_cache=False).logits.float() / 2).log_softmax(-1)
    top = logp.topk(64, dim=-1)
    return top.values, top.indices


_TWO_LINEARS = lowrank_op._two_autocast_linears


def _float32_intermediate(x, U, V, bias):
    return lowrank_op._lowrank_linear_op(x, U, V, bias)


def _weights(model, compute_dtype) -> dict[str, dict]:
    """Each parameter's values as ``plain``/``fused`` see them and as ``healing`` does (cast once)."""
    before = {id(p): p.data for p in model.parameters()}
    with frozen_weights_cast(model, compute_dtype, (torch.nn.Linear, LowRankLinear)):
        now = {id(p): p.data for p in model.parameters()}
    return {"before": before, "now": now}


def _step(model, ids, logp, index, head, compute_dtype, weights: dict, now: bool, attention: bool) -> tuple[float, float]:
    for p in model.parameters():
        p.data = weights[id(p)]
    lowrank_op._two_autocast_linears = _TWO_LINEARS if now else _float32_intermediate
    start = time.perf_counter()
    with autocast(compute_dtype, ids.device), steering_attention(model, compute_dtype if attention else "float32"):
        loss = coarsened_kl(model, ids, logp, index, head)
    loss.backward()
    for p in _factors(model):
        p.grad = None
    return time.perf_counter() - start, loss.item()


# Operators by what they do, matched on profiler names. Only attention multiplies batches of
# matrices and takes a softmax (lowrank_infer.cpu_attention's chunks).
_KINDS = (("matrix products", ("aten::mm", "aten::addmm", "aten::baddbmm", "aten::linear")),
          ("attention", ("scaled_dot_product", "flash_attention", "_CausalAttention", "aten::bmm", "softmax")))


def _breakdown(run, rounds: int) -> dict[str, float]:
    """Seconds per call of ``run`` by kind of operator (self CPU time, ``rounds`` calls profiled)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            run()
    seconds = {kind: 0.0 for kind, _ in _KINDS} | {"everything else": 0.0}
    for event in prof.key_averages():
        kind = next((k for k, names in _KINDS if any(n in event.key for n in names)), "everything else")
        seconds[kind] += event.self_cpu_time_total / 1e6 / rounds
    return seconds


def _print_breakdown(what: str, seconds: dict[str, float]) -> None:
    total = sum(seconds.values())
    shares = ", ".join(f"{kind} {value:.3f} s ({value / total:.0%})" for kind, value in seconds.items())
    print(f"{what}: {total:.3f} s profiled: {shares}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a compressed checkpoint")
    parser.add_argument("--rounds", type=int, default=8, help="steps per path (after one warm-up step each)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="windows per step")
    parser.add_argument("--compute-dtype", default="bfloat16")
    parser.add_argument("--breakdown", action="store_true", help="then profile healing steps by kind of operator")
    parser.add_argument("--dense", metavar="MODEL", help="with --breakdown, also the dense model's target forward")
    args = parser.parse_args()
    if args.dense and not args.breakdown:
        parser.error("--dense profiles the dense targets for --breakdown: pass both")
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
    weights = _weights(model, args.compute_dtype)
    healing_head = frozen_copy(head, args.compute_dtype)
    paths = {"plain": (None, "before", False), "fused": (head, "before", False),
             "healing, SDPA": (healing_head, "now", False), "healing": (healing_head, "now", True)}
    times = {name: [] for name in paths}
    losses = {}
    try:
        for round_ in range(args.rounds + 1):
            for name, (path_head, which, attention) in paths.items():
                seconds, losses[name] = _step(model, ids, logp, index, path_head, args.compute_dtype, weights[which],
                                              which == "now", attention)
                if round_:  # the first round warms up
                    times[name].append(seconds)
    finally:
        lowrank_op._two_autocast_linears = _TWO_LINEARS
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in paths:
        print(f"{name}: {median[name]:.3f} s a step (median of {args.rounds}), loss {losses[name]:.6f}")
    print(f"plain / fused: {median['plain'] / median['fused']:.2f}x, fused / healing, SDPA: "
          f"{median['fused'] / median['healing, SDPA']:.2f}x, healing, SDPA / healing: "
          f"{median['healing, SDPA'] / median['healing']:.2f}x")
    if args.breakdown:
        for name in ("healing, SDPA", "healing"):
            _print_breakdown(f"{name} step", _breakdown(lambda: _step(model, ids, logp, index, healing_head, args.compute_dtype,
                                                                      weights["now"], True, paths[name][2]),
                                                        max(2, args.rounds // 2)))
    if args.dense:
        dense = load_model(args.dense)[0].eval()
        _print_breakdown("dense targets of one step's windows", _breakdown(
            lambda: teacher_targets(dense, ids, compute_dtype=args.compute_dtype), max(2, args.rounds // 2)))


if __name__ == "__main__":
    main()
