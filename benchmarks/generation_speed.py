"""Time the generated calibration windows: the project's sampler against ``model.generate`` with
the same nucleus sampling (both seeded, one after the other in one process), or, with
``--batch-sizes``, the project's sampler at several batch sizes one after the other (what
``compress --batch-size`` chooses for ``--calib-generated``).

usage: python benchmarks/generation_speed.py [--samples 32] [--seq-len 512] [--batch-size 32 | --batch-sizes 32,128]
"""
from __future__ import annotations

import argparse
import time

import torch

from lowrank_infer import cli
from lowrank_infer.data import generated_ids


def hf_generate(model, tokenizer, samples, seq_len, batch_size, top_p=0.95):
    start, windows = tokenizer.bos_token_id, []
    for index, first in enumerate(range(0, samples, batch_size)):
        prompt = torch.full((min(batch_size, samples - first), 1), start)
        torch.manual_seed(index)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=top_p, top_k=0,
                             max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=start)
        windows.append(out[:, :seq_len])
    return torch.cat(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")],
                        help="comma-separated: time the project's sampler at each of these batch sizes instead")
    args = parser.parse_args()
    model, tokenizer, model_id = cli._load_for_analysis(cli.build_parser().parse_args(
        ["compress", "--model", "smollm2-135m", "--keep", "0.8", "--out", "unused"]))
    model.eval()
    if args.batch_sizes:
        runs = {f"generated_ids, batch {b}": (b, lambda b=b: generated_ids(model, tokenizer, args.samples, args.seq_len,
                                                                          batch_size=b)) for b in args.batch_sizes}
    else:
        runs = {"lowrank_infer.data.generated_ids": (args.batch_size, lambda: generated_ids(
                    model, tokenizer, args.samples, args.seq_len, batch_size=args.batch_size)),
                "transformers generate": (args.batch_size, lambda: hf_generate(
                    model, tokenizer, args.samples, args.seq_len, args.batch_size))}
    seconds = {}
    for name, (batch, run) in runs.items():
        began = time.perf_counter()
        with torch.no_grad():
            ids = run()
        seconds[name] = time.perf_counter() - began
        assert ids.shape == (args.samples, args.seq_len)
        print(f"{name}: {seconds[name]:.1f} s for {args.samples} x {args.seq_len} tokens "
              f"(batch {batch}, {model_id}, {torch.get_num_threads()} threads)", flush=True)
    names = list(seconds)
    print(f"ratio {names[1]} / {names[0]}: {seconds[names[1]] / seconds[names[0]]:.2f}")


if __name__ == "__main__":
    main()
