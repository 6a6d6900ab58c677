"""Perplexity of checkpoints on the held-out part of their calibration text.

compress fits nothing on the last part of ``--calib-file`` (the held-out fraction): it only
scores there, to stop refinement and healing and to train ARA's masks. Perplexity on that part
is therefore a validation score, for comparing settings without looking at the evaluation texts.
The text is cleaned and split exactly as compress does it.

usage: python benchmarks/held_perplexity.py CKPT [CKPT ...] --calib-file ../shared/data/wikitext2/valid.tokens.txt
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

from lowrank_infer.bench.output import environment
from lowrank_infer.data import calibration_split
from lowrank_infer.evaluate import perplexity
from lowrank_infer.models import load_model


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="compressed checkpoints made with this --calib-file")
    parser.add_argument("--calib-file", required=True, help="the calibration text the checkpoints were made with")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40, help="most windows of --seq-len tokens")
    args = parser.parse_args(argv)
    print("command: python benchmarks/held_perplexity.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    print(f"machine: {environment(torch.device('cpu'))['device_label']}, {torch.get_num_threads()} threads")
    rows = []
    for checkpoint in args.checkpoints:
        model, tokenizer, _ = load_model(checkpoint)
        tokens = calibration_split(args.calib_file, tokenizer)[1]
        result = perplexity(model, tokens, seq_len=args.seq_len, max_windows=args.windows, batch_size=1, progress=False)
        rows.append({"checkpoint": checkpoint, "held_perplexity": round(result["perplexity"], 3),
                     "windows": result["windows"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
