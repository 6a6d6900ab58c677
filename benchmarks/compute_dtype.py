"""What ``--compute-dtype bfloat16`` costs and buys on this machine, side by side in one process:
how far the dense model's next-token distribution moves (KL from the float32 one, and the
perplexity of both), and the time of the passes it covers (a forward, as for the dense targets,
and a forward and backward to every weight, as for training), and of the sampler it leaves alone.

usage: python benchmarks/compute_dtype.py [--text-file FILE] [--windows 8] [--seq-len 256] [--samples 32]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from lowrank_infer import cli
from lowrank_infer.data import load_text, tokenize_text
from lowrank_infer.precision import autocast, native_bfloat16
from lowrank_infer.sampling import sample_windows

DTYPES = ("float32", "bfloat16")


def _timed(run):
    began = time.perf_counter()
    result = run()
    return result, time.perf_counter() - began


@torch.no_grad()
def _log_probs(model, ids, compute_dtype):
    with autocast(compute_dtype, "cpu"):
        return model(ids).logits.float().log_softmax(-1)


def _train_step(model, ids, compute_dtype):
    with autocast(compute_dtype, "cpu"):
        loss = model(ids[:2], labels=ids[:2]).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def _sample(model, rows, seq_len, compute_dtype):
    with autocast(compute_dtype, "cpu"):
        return sample_windows(model, 1, rows, seq_len, top_p=0.95, banned=[])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-file", default="../shared/data/wikitext2/test.raw.txt")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--samples", type=int, default=32, help="rows of one batch of --sample-len tokens")
    parser.add_argument("--sample-len", type=int, default=128, help="tokens per sampled row (128 as --calib-sample-len)")
    args = parser.parse_args()
    model, tokenizer, model_id = cli._load_for_analysis(cli.build_parser().parse_args(
        ["compress", "--model", "smollm2-135m", "--keep", "0.8", "--out", "unused"]))
    model.eval()
    print(f"{model_id}, {torch.get_num_threads()} threads, native bfloat16 on this CPU: {native_bfloat16('cpu')}")
    tokens = tokenize_text(tokenizer, load_text(args.text_file, split="eval"))
    ids = tokens[: args.windows * args.seq_len].reshape(args.windows, args.seq_len)
    _log_probs(model, ids[:1], "bfloat16")  # warm-up: the first bfloat16 call sets up its kernels
    logp, seconds = {}, {}
    for dtype in DTYPES:
        logp[dtype], seconds[f"forward {dtype}"] = _timed(lambda: _log_probs(model, ids, dtype))
    exact, fast = logp["float32"], logp["bfloat16"]
    kl = float((exact.exp() * (exact - fast)).sum(-1).mean())
    nll = {d: float(-logp[d][:, :-1].gather(-1, ids[:, 1:, None]).mean()) for d in DTYPES}
    print(f"{args.windows} windows x {args.seq_len} tokens of {args.text_file}: KL(float32 || bfloat16) = {kl:.5f} "
          f"nats/token; perplexity float32 {math.exp(nll['float32']):.3f}, bfloat16 {math.exp(nll['bfloat16']):.3f}")
    for dtype in DTYPES:
        _, seconds[f"forward+backward of 2 windows {dtype}"] = _timed(lambda: _train_step(model, ids, dtype))
    for dtype in DTYPES:
        torch.manual_seed(0)
        _, seconds[f"sampler {dtype}"] = _timed(lambda: _sample(model, args.samples, args.sample_len, dtype))
    for what in ("forward", "forward+backward of 2 windows", "sampler"):
        a, b = seconds[f"{what} float32"], seconds[f"{what} bfloat16"]
        print(f"{what}: float32 {a:.1f} s, bfloat16 {b:.1f} s, ratio float32 / bfloat16 {a / b:.2f}")


if __name__ == "__main__":
    main()
