"""End to end: vLLM serves a compressed checkpoint exactly as transformers runs it.

One ``LLM`` per checkpoint (starting one is most of the cost), shared by the tests through a
module-scoped fixture; every generate call carries all the prompts.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="needs vLLM, installed in a venv of its own: see tests/vllm_plugin/README.md")

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from lowrank_infer.allocation import RankPlan  # noqa: E402
from lowrank_infer.io import PLAN_FILE  # noqa: E402
from vllm_checkpoints import mixed_checkpoint, reference_greedy, served_model, uniform_checkpoint  # noqa: E402

PROMPTS = [[1, 40, 41, 42, 43], [1, 70, 80, 90, 100, 110, 120, 33, 34], [1, 50], [1, 99, 98, 97, 96, 95, 94]]
MAX_TOKENS = 16
# float32 on both sides; only the order of the sums differs between vLLM's kernels and torch's.
LOGPROB_ATOL = 1e-4

# name → (architecture, checkpoint maker, tensor-parallel size)
CHECKPOINTS = {
    "llama-uniform": ("llama", uniform_checkpoint, 1),
    "llama-mixed": ("llama", mixed_checkpoint, 1),
    "llama-mixed-tp2": ("llama", mixed_checkpoint, 2),  # one k/v head: vLLM puts it on both ranks
    "qwen2-mixed": ("qwen2", mixed_checkpoint, 1),  # q/k/v carry biases
    "phi3-mixed": ("phi3", mixed_checkpoint, 1),  # q/k/v and gate/up fused in the checkpoint too
}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def served(request, tmp_path_factory):
    """``(llm, checkpoint directory, arch)`` for one compressed checkpoint."""
    arch, make, tp = CHECKPOINTS[request.param]
    path = make(arch, tmp_path_factory.mktemp(request.param) / "ckpt")
    with pytest.MonkeyPatch.context() as env:
        # apply_model ships a function to the engine's workers, which vLLM refuses without this.
        env.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        if tp > 1:
            # vLLM binds each CPU worker to a NUMA node of its own unless told which cores to use.
            env.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core) for core in range(tp)))
        llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=128,
                  max_num_seqs=len(PROMPTS), kv_cache_memory_bytes=64 * 2**20, tensor_parallel_size=tp, seed=0)
        yield llm, path, arch
        llm.llm_engine.engine_core.shutdown()


def _vllm_greedy(llm) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    results = []
    for out in outputs:
        tokens = list(out.outputs[0].token_ids)
        results.append((tokens, [step[tok].logprob for step, tok in zip(out.outputs[0].logprobs, tokens)]))
    return results


def test_greedy_tokens_match_transformers(served):
    llm, path, _ = served
    expected = reference_greedy(path, PROMPTS, MAX_TOKENS)
    got = _vllm_greedy(llm)
    for prompt, (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(PROMPTS, got, expected):
        assert tokens == ref_tokens, f"prompt {prompt}"
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=LOGPROB_ATOL, rtol=0)


def test_reference_tells_compressed_from_dense(served):
    """The comparison above can fail: the dense model's greedy tokens are not the compressed one's."""
    _, path, arch = served
    dense = served_model(arch)
    compressed = [tokens for tokens, _ in reference_greedy(path, PROMPTS, MAX_TOKENS)]
    dense_tokens = [dense.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(p):].tolist()
                    for p in PROMPTS]
    assert dense_tokens != compressed


def _linear_methods(model) -> dict[str, str]:
    from vllm.model_executor.layers.linear import LinearBase

    return {name: type(m.quant_method).__name__ for name, m in model.named_modules() if isinstance(m, LinearBase)}


def test_planned_layers_run_the_lowrank_method(served):
    """Groups with a low-rank member hold factors; all-dense groups keep vLLM's dense method."""
    llm, path, _ = served
    per_rank = llm.apply_model(_linear_methods)
    groups: dict[str, list[int | None]] = {}
    for name, rank in RankPlan.load(path / PLAN_FILE).ranks.items():
        groups.setdefault(_merged_name(name), []).append(rank)
    expected = {name: "UnquantizedLinearMethod" if all(r is None for r in ranks) else "LowRankLinearMethod"
                for name, ranks in groups.items()}
    assert per_rank == [expected] * len(per_rank)


def _merged_name(name: str) -> str:
    """The vLLM layer a checkpoint linear lands in (q/k/v → qkv_proj, gate/up → gate_up_proj)."""
    parent, _, leaf = name.rpartition(".")
    merged = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
    return f"{parent}.{merged.get(leaf, leaf)}"
