"""The computed (not measured) memory figures the README quotes, from the library's own rules.

* Compression on large models: per-block statistics, spectra per allocator, the model, and
  host memory with ``--weights-on-disk --work-dir`` for SmolLM2-135M, LLaMA-2-7B and -70B.
* Healing at a uniform plan (keep 0.8): the compressed model on the device, plus per factor
  weight what training it takes (float32 master, its gradient, Adam's two moments, the model-dtype
  gradient: ``lowrank_infer.training``); block refinement holds one block's factors so.
* vLLM tensor parallel: factor numbers per rank of a 4096×4096 layer at keep 0.6, dense / half /
  full sharding at TP 2, 4, 8.

    python benchmarks/memory_formulas.py --out benchmarks/results/memory_formulas.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowrank_infer.allocation import ARAConfig, UniformConfig
from lowrank_infer.allocation.uniform import uniform_rank
from lowrank_infer.healing import training_bytes_per_weight

GB = 1e9
# name: (hidden, MLP width, blocks, key/value width, vocabulary, tied head, bytes per weight)
MODELS = {
    "smollm2-135m": (576, 1536, 30, 192, 49152, True, 4),  # float32, as the packaged GGUF loads
    "llama2-7b": (4096, 11008, 32, 4096, 32000, False, 2),  # bf16
    "llama2-70b": (8192, 28672, 80, 1024, 32000, False, 2),  # bf16, GQA
}


def _linears(h: int, inter: int, kv: int) -> list[tuple[int, int]]:
    """(out, in) of one block's target linears: q, k, v, o, gate, up, down."""
    return [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]


def _spectra_bytes(linears, config) -> int:
    """float32 factors up to the config's cap and float64 singular values, per block."""
    total = 0
    for m, n in linears:
        k = min(config.factor_cap(m, n), m, n)
        total += 4 * (m + n) * k + 8 * min(m, n)
    return total


def compression_memory() -> dict:
    rows = {}
    for name, (h, inter, blocks, kv, vocab, tied, size) in MODELS.items():
        linears = _linears(h, inter, kv)
        stats = 8 * (3 * h * h + inter * inter)  # q/k/v share one XᵀX, gate/up another
        block_weights = size * (sum(m * n for m, n in linears) + 2 * h)  # + two norms
        embeddings = size * vocab * h * (1 if tied else 2) + size * h
        uniform, ara = _spectra_bytes(linears, UniformConfig()), _spectra_bytes(linears, ARAConfig())
        rows[name] = {
            "statistics_one_block_gb": stats / GB, "statistics_all_blocks_gb": stats * blocks / GB,
            "spectra_uniform_drank_gb": uniform * blocks / GB, "spectra_ara_gb": ara * blocks / GB,
            "model_gb": (embeddings + blocks * block_weights) / GB,
            "weights_on_disk": {"embeddings_gb": embeddings / GB, "one_block_gb": block_weights / GB,
                                "one_block_statistics_gb": stats / GB, "one_block_spectra_gb": uniform / GB,
                                "total_gb_plus_compressed_model": (embeddings + block_weights + stats + uniform) / GB},
        }
    return rows


def healing_memory(keep: float = 0.8) -> dict:
    """Device memory of healing (the whole compressed model) and of block refinement (one block)."""
    rows = {}
    for name, (h, inter, blocks, kv, vocab, tied, size) in MODELS.items():
        factors = dense = 0
        for m, n in _linears(h, inter, kv):
            k = uniform_rank(m, n, keep)
            if k * (m + n) < m * n:
                factors += k * (m + n)
            else:
                dense += m * n
        extra = training_bytes_per_weight(size)
        embeddings = size * vocab * h * (1 if tied else 2) + size * h
        model = embeddings + blocks * size * (factors + dense + 2 * h)
        rows[name] = {"keep": keep, "factor_weights": factors * blocks, "compressed_model_gb": model / GB,
                      "training_bytes_per_factor_weight": extra,
                      "healing_gb": (model + blocks * factors * extra) / GB,
                      # refinement trains float32 copies of one block's factors and of the layers it
                      # keeps dense: copy, gradient, moments
                      "refinement_one_block_gb": (factors + dense) * 16 / GB,
                      "refinement_one_block_kept_dense_gb": sum(m * n for m, n in _linears(h, inter, kv)) * 16 / GB}
    return rows


def tensor_parallel_numbers(m: int = 4096, n: int = 4096, keep: float = 0.6) -> dict:
    """Factor numbers per rank (README "Serving with vLLM"), column-parallel layer."""
    k = uniform_rank(m, n, keep)
    rows = {}
    for tp in (2, 4, 8):
        padded = -(-k // tp) * tp
        rows[tp] = {"dense": m * n / tp, "half": m * k / tp + n * k, "full": (m + n) * padded / tp,
                    "k": k, "k_padded": padded}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = {"kind": "computed from formulas, not measured",
              "compression": compression_memory(), "healing": healing_memory(), "vllm_tp_4096x4096_keep0.6": tensor_parallel_numbers()}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
