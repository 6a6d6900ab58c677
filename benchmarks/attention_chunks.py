"""Milliseconds for one layer's causal attention, forward and backward, in bfloat16 on the CPU:
PyTorch's SDPA (its flash-attention kernel, grouped-query) beside :mod:`lowrank_infer.cpu_attention`
at several chunk sizes, alternating call by call (medians reported). Random inputs of one shape
(default SmolLM2's: 9 query heads, 3 key/value heads, head size 64, 512 tokens); the time does not
depend on the values.

usage: python benchmarks/attention_chunks.py [--heads 9] [--kv-heads 3] [--head-dim 64] [--seq-len 512]
    [--chunks 64 128 256 512] [--rounds 30]
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import lowrank_infer.cpu_attention as cpu_attention
from lowrank_infer.bench.output import environment


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256, 512], help="query rows per chunk")
    parser.add_argument("--rounds", type=int, default=30, help="calls per variant (after 3 warm-up calls each)")
    args = parser.parse_args()
    if min(args.chunks) < 1 or args.heads % args.kv_heads:
        parser.error("--chunks must be >= 1 and --heads a multiple of --kv-heads")
    print(("command: python benchmarks/attention_chunks.py " + shlex.join(sys.argv[1:])).rstrip())
    print(f"machine: {environment(torch.device('cpu'))['device_label']}, {torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, args.seq_len, args.head_dim, generator=gen).to(torch.bfloat16).requires_grad_()
               for h in (args.heads, args.kv_heads, args.kv_heads))
    grad = torch.randn(1, args.heads, args.seq_len, args.head_dim, generator=gen).to(torch.bfloat16)
    scale = args.head_dim ** -0.5

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).backward(grad)

    def chunked(rows):
        def run():
            cpu_attention.CHUNK_ROWS = rows
            cpu_attention.causal_attention(q, k, v, scale).backward(grad)
        return run

    variants = {"SDPA": sdpa} | {f"chunks of {rows}": chunked(rows) for rows in args.chunks}
    default = cpu_attention.CHUNK_ROWS
    times = {name: [] for name in variants}
    try:
        for round_ in range(args.rounds + 3):
            for name, run in variants.items():
                seconds = _seconds(run)
                if round_ >= 3:
                    times[name].append(seconds)
    finally:
        cpu_attention.CHUNK_ROWS = default
    sdpa_ms = statistics.median(times["SDPA"]) * 1e3
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        print(f"{name}: {ms:.2f} ms forward and backward (median of {args.rounds}), SDPA / this {sdpa_ms / ms:.2f}x")


if __name__ == "__main__":
    main()
