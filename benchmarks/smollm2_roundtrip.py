"""Round trip on the real SmolLM2-135M: compress, save, reload in a new process, compare.

    python benchmarks/smollm2_roundtrip.py --out /tmp/smol-rt \
        --json benchmarks/results/roundtrip_smollm2.json

Compresses at keep 0.8 (uniform, whitened, 32 calibration windows x 512 tokens of WikiText-2
validation), saves the checkpoint, then a fresh Python process loads it with
``load_compressed`` and recomputes the logits of the same token ids. Reports the largest logit
difference, the parameter count against the plan's, and any pickle-format file in the directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowrank_infer.atomic import atomic_write_text

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

RELOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from lowrank_infer import load_compressed
from lowrank_infer.report import model_size
model = load_compressed(sys.argv[1])
ids = load_file(sys.argv[2])["ids"]
with torch.no_grad():
    logits = model(ids).logits
save_file({"logits": logits.contiguous(), "params": torch.tensor(model_size(model)["params"])}, sys.argv[3])
"""


def _compress(args) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from lowrank_infer.compress import compress
    from lowrank_infer.allocation import UniformConfig
    from lowrank_infer.data import calibration_ids, load_text, tokenize_text
    from lowrank_infer.io import save_compressed
    from lowrank_infer.models import load_model
    from lowrank_infer.report import model_size

    model, tokenizer, model_id = load_model("smollm2-135m")
    dense_params = model_size(model)["params"]
    calib = calibration_ids(tokenize_text(tokenizer, load_text(args.calib_file)), args.samples, args.seq_len)
    start = time.perf_counter()
    result = compress(model, UniformConfig(keep=args.keep), calib_ids=calib, model_id=model_id)
    seconds = time.perf_counter() - start
    save_compressed(model, args.out, tokenizer, overwrite=True)
    ids = calib[:2, :128]
    with torch.no_grad():
        logits = model(ids).logits
    summary = result.plan.summary()
    info = {"dense_params": dense_params, "plan_params_removed": summary["params_before"] - summary["params_after"],
            "keep_achieved": summary["keep_achieved"], "seconds": {**result.seconds, "total": seconds}}
    return ids, logits, info


def _reload_in_new_process(out: Path, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file({"ids": ids.contiguous()}, f"{tmp}/ids.safetensors")
        subprocess.run([sys.executable, "-c", RELOAD, str(out), f"{tmp}/ids.safetensors", f"{tmp}/out.safetensors"],
                       check=True)
        result = load_file(f"{tmp}/out.safetensors")
    return result["logits"], int(result["params"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--calib-file", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext2/valid.tokens.txt"))
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    ids, logits, info = _compress(args)
    reloaded, params = _reload_in_new_process(args.out, ids)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "keep": args.keep, "calibration": f"{args.samples} x {args.seq_len} tokens of {Path(args.calib_file).name}",
        "max_abs_logit_diff": float((reloaded - logits).abs().max()),
        "reloaded_params": params,
        "expected_params": info["dense_params"] - info["plan_params_removed"],
        "pickle_files": sorted(p.name for p in args.out.iterdir() if p.suffix in PICKLE_SUFFIXES),
        "files": sorted(p.name for p in args.out.iterdir()),
        "torch": torch.__version__,
        **info,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        atomic_write_text(args.json, text + "\n")


if __name__ == "__main__":
    main()
