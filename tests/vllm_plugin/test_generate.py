"""End to end: vLLM serves a compressed checkpoint exactly as transformers runs it.

One ``LLM`` per checkpoint (starting one is most of the cost), shared by the tests through a
module-scoped fixture; every generate call carries all the prompts.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="needs vLLM, installed in a venv of its own: see tests/vllm_plugin/README.md")

import torch  # noqa: E402

from lowrank_infer.allocation import RankPlan  # noqa: E402
from lowrank_infer.io import PLAN_FILE  # noqa: E402
from lowrank_infer.vllm_plugin.sharding import TP_SHARDING_ENV  # noqa: E402
from vllm_checkpoints import (  # noqa: E402
    factor_sizes,
    linear_methods,
    mixed_checkpoint,
    reference_greedy,
    served_model,
    started_llm,
    uniform_checkpoint,
    vllm_greedy,
)

PROMPTS = [[1, 40, 41, 42, 43], [1, 70, 80, 90, 100, 110, 120, 33, 34], [1, 50], [1, 99, 98, 97, 96, 95, 94]]
MAX_TOKENS = 16
ROW_PARALLEL = ("o_proj", "down_proj")
# float32 on both sides; only the order of the sums differs between vLLM's kernels and torch's.
LOGPROB_ATOL = 1e-4

# name → (architecture, checkpoint maker, tensor-parallel size, tensor-parallel sharding)
CHECKPOINTS = {
    "llama-uniform": ("llama", uniform_checkpoint, 1, "half"),
    "llama-mixed": ("llama", mixed_checkpoint, 1, "half"),
    "llama-mixed-tp2": ("llama", mixed_checkpoint, 2, "half"),  # one k/v head: vLLM puts it on both ranks
    # V split along k: the switch must reach vLLM's workers, and one all-gather or all-reduce of
    # the [T, k] intermediate per layer must give transformers' tokens.
    "llama-mixed-tp2-full": ("llama", mixed_checkpoint, 2, "full"),
    "qwen2-mixed": ("qwen2", mixed_checkpoint, 1, "half"),  # q/k/v carry biases
    "phi3-mixed": ("phi3", mixed_checkpoint, 1, "half"),  # q/k/v and gate/up fused in the checkpoint too
}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def served(request, tmp_path_factory):
    """``(llm, checkpoint directory, arch, tensor-parallel sharding)`` for one compressed checkpoint."""
    arch, make, tp, sharding = CHECKPOINTS[request.param]
    path = make(arch, tmp_path_factory.mktemp(request.param) / "ckpt")
    with started_llm(path, tp=tp, max_num_seqs=len(PROMPTS), env={TP_SHARDING_ENV: sharding}) as llm:
        yield llm, path, arch, sharding


def test_greedy_tokens_match_transformers(served):
    llm, path, _, _ = served
    expected = reference_greedy(path, PROMPTS, MAX_TOKENS)
    got = vllm_greedy(llm, PROMPTS, MAX_TOKENS)
    for prompt, (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(PROMPTS, got, expected):
        assert tokens == ref_tokens, f"prompt {prompt}"
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=LOGPROB_ATOL, rtol=0)


def test_reference_tells_compressed_from_dense(served):
    """The comparison above can fail: the dense model's greedy tokens are not the compressed one's."""
    _, path, arch, _ = served
    dense = served_model(arch)
    compressed = [tokens for tokens, _ in reference_greedy(path, PROMPTS, MAX_TOKENS)]
    dense_tokens = [dense.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(p):].tolist()
                    for p in PROMPTS]
    assert dense_tokens != compressed


def test_planned_layers_run_the_lowrank_method(served):
    """Groups with a low-rank member hold factors; all-dense groups keep vLLM's dense method."""
    llm, path, _, _ = served
    per_rank = llm.apply_model(linear_methods)
    groups: dict[str, list[int | None]] = {}
    for name, rank in RankPlan.load(path / PLAN_FILE).ranks.items():
        groups.setdefault(_merged_name(name), []).append(rank)
    expected = {name: "UnquantizedLinearMethod" if all(r is None for r in ranks) else "LowRankLinearMethod"
                for name, ranks in groups.items()}
    assert per_rank == [expected] * len(per_rank)


def test_fully_sharded_layers_hold_their_share_of_k(served):
    """Fully sharded: column-parallel layers hold ``V[:, ⌈k/tp⌉]``, row-parallel ones ``U[m/tp, :]``.

    Half sharding would hold all of V, or all of U: test_layers.py checks both layouts' memory.
    """
    llm, path, _, sharding = served
    if sharding != "full":
        pytest.skip("checks the fully sharded layout")
    per_rank = llm.apply_model(factor_sizes)
    tp = len(per_rank)
    expected: dict[str, int | tuple[int, int]] = {}  # column: V's numbers; row: U's and V's
    for layer in RankPlan.load(path / PLAN_FILE).layers:
        name = _merged_name(layer.name)
        if layer.rank is None:
            continue
        if name.endswith(ROW_PARALLEL):  # one linear per layer; its input and U's rows split
            expected[name] = (layer.out_features // tp * layer.rank, layer.in_features // tp * layer.rank)
        else:  # merged q/k/v or gate/up: each low-rank slice's k split, padded to a multiple of tp
            expected[name] = expected.get(name, 0) + layer.in_features * -(-layer.rank // tp)
    for numbers in per_rank:
        assert {name: (u, v) if name.endswith(ROW_PARALLEL) else v for name, (u, v) in numbers.items()} == expected


def _merged_name(name: str) -> str:
    """The vLLM layer a checkpoint linear lands in (q/k/v → qkv_proj, gate/up → gate_up_proj)."""
    parent, _, leaf = name.rpartition(".")
    merged = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
    return f"{parent}.{merged.get(leaf, leaf)}"
