"""Compressed tiny checkpoints for the vLLM tests, the transformers reference, and vLLM's side.

A plain module (not conftest) so that test files and the processes they spawn can import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import lowrank_infer
from lowrank_infer.allocation import plan_from_ranks
from lowrank_infer.structure import target_shapes
from tiny_models import tiny_config, tiny_tokenizer

# Dense layers of the ARA-like plan, per decoder block: every kind of group vLLM merges —
# q/k/v low-rank then two adjacent dense ones, dense then low-rank, gate/up all dense (served by
# vLLM's own dense method), Phi-3's fused qkv/gate_up dense in one block and low-rank in the other.
MIXED_DENSE = ({"k_proj", "v_proj", "o_proj", "up_proj", "gate_up_proj"},
               {"q_proj", "gate_proj", "up_proj", "qkv_proj"})


def served_model(arch: str, seed: int = 0):
    """A tiny ``arch`` model that vLLM's CPU attention can run and whose layers matter.

    vLLM's CPU attention has no kernel for heads under 32 wide, hence 2 query heads and one
    key/value head of 32 over hidden size 64 (still grouped-query). With untied embeddings and a
    wider initialization the decoder layers, not the token's own embedding, pick the next token,
    so a wrong layer changes the greedy tokens.
    """
    from transformers import AutoModelForCausalLM

    base = tiny_config(arch)
    config = type(base).from_dict({**base.to_dict(), "num_attention_heads": 2, "num_key_value_heads": 1,
                                   "head_dim": 32, "tie_word_embeddings": False, "initializer_range": 0.1})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def uniform_checkpoint(arch: str, path: Path) -> Path:
    """Every target linear low-rank at keep 0.5 (plain SVD: no calibration data needed)."""
    model = served_model(arch)
    lowrank_infer.compress(model, lowrank_infer.UniformConfig(keep=0.5, whiten=False), progress=False)
    return lowrank_infer.save_compressed(model, path, tiny_tokenizer())


def mixed_checkpoint(arch: str, path: Path) -> Path:
    """An ARA-like plan: some linears dense (:data:`MIXED_DENSE`), the others at a quarter rank."""
    model = served_model(arch)
    shapes = target_shapes(model)
    ranks = {name: None if _leaf(name) in MIXED_DENSE[_block(name)] else min(shape) // 4
             for name, shape in shapes.items()}
    plan = plan_from_ranks(shapes, ranks, keep=0.7, method="ara", model=f"tiny-{arch}")
    config = lowrank_infer.MethodConfig(keep=plan.keep_target, whiten=False)
    lowrank_infer.compress(model, plan=plan, config=config, progress=False)
    return lowrank_infer.save_compressed(model, path, tiny_tokenizer())


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _block(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def reference_greedy(path: Path, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probabilities from transformers on the same checkpoint."""
    model = lowrank_infer.load_compressed(path, dtype=torch.float32)
    results = []
    for prompt in prompts:  # one at a time: no padding, so nothing differs from vLLM's input
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[tok].item() for step, tok in zip(out.logits, tokens)]
        results.append((tokens, logprobs))
    return results


@contextmanager
def started_llm(path: Path, *, tp: int = 1, max_num_seqs: int = 4, env: dict[str, str] | None = None) -> Iterator:
    """A float32, eager ``LLM`` on ``path`` (shut down on exit), with ``env`` set while it runs."""
    from vllm import LLM

    with pytest.MonkeyPatch.context() as patch:
        # apply_model ships a function to the engine's workers, which vLLM refuses without this.
        patch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        if tp > 1:
            # vLLM binds each CPU worker to a NUMA node of its own unless told which cores to use.
            patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core) for core in range(tp)))
        for name, value in (env or {}).items():
            patch.setenv(name, value)  # vLLM's workers inherit the engine's environment
        llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=max_num_seqs,
                  kv_cache_memory_bytes=64 * 2**20, tensor_parallel_size=tp, seed=0)
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()


def vllm_greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probabilities from vLLM, all prompts in one call."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    results = []
    for out in outputs:
        tokens = list(out.outputs[0].token_ids)
        results.append((tokens, [step[tok].logprob for step, tok in zip(out.outputs[0].logprobs, tokens)]))
    return results


def linear_methods(model) -> dict[str, str]:
    """Each vLLM linear layer's method class (run in the engine's workers through ``apply_model``)."""
    from vllm.model_executor.layers.linear import LinearBase

    return {name: type(m.quant_method).__name__ for name, m in model.named_modules() if isinstance(m, LinearBase)}


def factor_sizes(model) -> dict[str, tuple[int, int]]:
    """``(U numbers, V numbers)`` of each low-rank vLLM layer on a worker (through ``apply_model``)."""
    from lowrank_infer.vllm_plugin import LowRankLinearMethod

    return {name: (m.U.numel(), m.V.numel()) for name, m in model.named_modules()
            if isinstance(getattr(m, "quant_method", None), LowRankLinearMethod)}
