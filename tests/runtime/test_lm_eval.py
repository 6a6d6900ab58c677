"""``lowrank-infer lm-eval``: the LM Evaluation Harness on a compressed checkpoint, offline."""

import json
import sys

import pytest

import lowrank_infer
from lowrank_infer.cli import main
from lowrank_infer.harness import lm_eval_results

from tiny_models import tiny_model, tiny_tokenizer
from tiny_tasks import TASK, accuracy, reference_loglikelihoods, sample_loglikelihoods, write_task


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_model("llama")
    lowrank_infer.compress(model, lowrank_infer.UniformConfig(keep=0.5, whiten=False), progress=False)
    return model, lowrank_infer.save_compressed(model, tmp_path / "ck", tiny_tokenizer())


def test_lm_eval_command_scores_the_compressed_model(checkpoint, tmp_path, capsys):
    model, path = checkpoint
    out = tmp_path / "results.json"
    tasks = write_task(tmp_path / "tasks")
    code = main(["lm-eval", str(path), "--tasks", TASK, "--include-path", str(tasks), "--device", "cpu",
                 "--output", str(out), "--log-samples", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    results = json.loads(out.read_text())
    want = reference_loglikelihoods(model, tiny_tokenizer())
    got = sample_loglikelihoods(results["samples"][TASK])
    assert len(got) == len(want)
    for got_item, want_item in zip(got, want):
        assert got_item == pytest.approx(want_item, abs=1e-4)
    assert results["results"][TASK]["acc,none"] == pytest.approx(accuracy(want))
    assert printed == results["results"]
    assert results["config"]["model"] == str(path)


def test_unknown_task_says_how_to_find_tasks(checkpoint, tmp_path):
    model, _ = checkpoint
    with pytest.raises(ValueError, match="unknown lm-eval task.*--include-path"):
        lm_eval_results(model, tiny_tokenizer(), ["no_such_task_xyz"], include_path=write_task(tmp_path / "tasks"))


def test_missing_lm_eval_package_says_what_to_install(checkpoint, monkeypatch):
    model, _ = checkpoint
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ImportError, match=r"pip install \"lowrank-infer\[eval\]\""):
        lm_eval_results(model, tiny_tokenizer(), [TASK])
