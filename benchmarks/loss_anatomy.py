"""Where a compressed checkpoint loses to its dense model, on one text, in one process:

- perplexity by position in the window (does the loss grow with context?);
- the next tokens inside and outside the dense model's 64 most likely and the
  probability each model leaves outside them;
- perplexity with one group of layer types put back to the dense weights (which compressions cost
  the most);
- copying: windows made of one random 64-token segment repeated, scored on the repeats (the dense
  model predicts a repeat almost perfectly once it has seen it).

usage: python benchmarks/loss_anatomy.py CHECKPOINT [--dense smollm2-135m] [--text-file FILE] [--windows 40] [--seq-len 512]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lowrank_infer.data import load_text, tokenize_text
from lowrank_infer.io import load_compressed
from lowrank_infer.models import load_model
from lowrank_infer.module import LowRankLinear

BUCKETS = ((0, 32), (32, 128), (128, 256), (256, 384), (384, None))
GROUPS = {"q_proj": ("q_proj",), "k_proj": ("k_proj",), "q_proj + k_proj": ("q_proj", "k_proj"),
          "o_proj": ("o_proj",), "MLP (gate, up, down)": ("gate_proj", "up_proj", "down_proj")}
TOP_K = 64


@torch.no_grad()
def _nll(model, windows: torch.Tensor) -> torch.Tensor:
    """``[windows, seq_len - 1]`` next-token negative log-likelihoods, four windows a pass."""
    return torch.cat([-_log_probs(model, rows).gather(-1, rows[:, 1:, None])[..., 0] for rows in windows.split(4)])


def _log_probs(model, rows: torch.Tensor) -> torch.Tensor:
    return model(input_ids=rows, use_cache=False).logits[:, :-1].float().log_softmax(-1)


@torch.no_grad()
def _against_top(dense, compressed, windows: torch.Tensor):
    """Both models' NLLs, whether the next token is in the dense top ``TOP_K``, and the probability
    each model leaves outside that top (mean over positions); four windows a pass, so that no
    vocabulary-wide tensor of the whole text is held."""
    nll_d, nll_c, inside, tail_d, tail_c = [], [], [], 0.0, 0.0
    for rows in windows.split(4):
        d, c, target = _log_probs(dense, rows), _log_probs(compressed, rows), rows[:, 1:, None]
        top = d.topk(TOP_K, dim=-1).indices
        nll_d.append(-d.gather(-1, target)[..., 0])
        nll_c.append(-c.gather(-1, target)[..., 0])
        inside.append((top == target).any(-1))
        tail_d += float((1 - d.gather(-1, top).exp().sum(-1)).sum())
        tail_c += float((1 - c.gather(-1, top).exp().sum(-1)).sum())
    positions = windows.shape[0] * (windows.shape[1] - 1)
    return torch.cat(nll_d), torch.cat(nll_c), torch.cat(inside), tail_d / positions, tail_c / positions


def _ppl(nll: torch.Tensor) -> float:
    return float(nll.mean().exp())


def _restored(checkpoint: str, dense, types: tuple[str, ...]):
    """The checkpoint with its low-rank layers of ``types`` replaced by the dense model's."""
    model = load_compressed(checkpoint, pack=False).eval()
    dense_modules = dict(dense.named_modules())
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if isinstance(module, LowRankLinear) and child in types:
            setattr(model.get_submodule(parent), child, dense_modules[name])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--dense", default="smollm2-135m", help="the dense model it was compressed from")
    parser.add_argument("--text-file", default="../shared/data/wikitext2/test.raw.txt")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    dense, tokenizer, _ = load_model(args.dense)
    compressed = load_compressed(args.checkpoint, pack=False).eval()
    tokens = tokenize_text(tokenizer, load_text(args.text_file, split="eval"))
    windows = tokens[: args.windows * args.seq_len].view(args.windows, args.seq_len)
    print(f"{args.checkpoint} against {args.dense}; {args.windows} x {args.seq_len} tokens of {args.text_file}")

    dense_nll, nll, inside, dense_tail, tail = _against_top(dense, compressed, windows)
    print(f"\nperplexity: dense {_ppl(dense_nll):.2f}, compressed {_ppl(nll):.2f}")

    print("\nby position in the window (next token's position)")
    for lo, hi in BUCKETS:
        d, c = dense_nll[:, lo:hi], nll[:, lo:hi]
        print(f"  {lo:>3}-{hi or args.seq_len - 1:<3}  dense {_ppl(d):7.2f}  compressed {_ppl(c):7.2f}  "
              f"ratio {float((c.mean() - d.mean()).exp()):.3f}")

    excess = nll - dense_nll
    print(f"\nthe dense model's top {TOP_K}: next token inside for {inside.float().mean():.3f} of positions; "
          f"probability outside it: dense {dense_tail:.4f}, compressed {tail:.4f}")
    print(f"  excess nats per token: inside {excess[inside].mean():.3f}, outside {excess[~inside].mean():.3f} "
          f"(outside's share of the excess {float(excess[~inside].sum() / excess.sum()):.2f})")

    print("\nwith one group put back to the dense weights")
    for label, types in GROUPS.items():
        print(f"  {label:<22} {_ppl(_nll(_restored(args.checkpoint, dense, types), windows)):.2f}", flush=True)

    vocab = dense.config.vocab_size
    segment = torch.randint(vocab // 50, vocab // 2, (8, 64), generator=torch.Generator().manual_seed(0))
    repeats = segment.repeat(1, args.seq_len // 64)
    print(f"\ncopying (8 windows of a random 64-token segment repeated), nats per token on the repeats: "
          f"dense {_nll(dense, repeats)[:, 63:].mean():.3f}, compressed {_nll(compressed, repeats)[:, 63:].mean():.3f}")


if __name__ == "__main__":
    main()
