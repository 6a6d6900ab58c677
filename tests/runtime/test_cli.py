"""The ``lowrank-infer`` command on a tiny local model: happy paths and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lowrank_infer.allocation import uniform_plan
from lowrank_infer.cli import main


def _run(*args, env=None):
    """Run the CLI in a subprocess (to see exit codes and stderr exactly as a user would)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("LOWRANK_INFER_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "lowrank_infer.cli", *map(str, args)], capture_output=True, text=True, env=full_env
    )


def _compress_args(model_dir, text, out, *extra):
    return ["compress", "--model", model_dir, "--calib-file", text, "--calib-samples", 4, "--seq-len", 32,
            "--out", out, *extra]


def test_compress_info_eval_generate(tiny_model_dir, tiny_text, tmp_path, capsys):
    out = tmp_path / "ck"
    code = main(list(map(str, _compress_args(tiny_model_dir, tiny_text, out, "--keep", 0.5,
                                             "--eval-file", tiny_text, "--eval-windows", 2))))
    assert code == 0
    printed = capsys.readouterr().out
    assert "achieved" in printed and "perplexity" in printed and "dense ->" in printed
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["summary"]["params_after"] < info["summary"]["params_before"]
    assert abs(info["summary"]["keep_achieved"] - 0.5) < 0.05
    assert main(["eval", str(out), "--text-file", str(tiny_text), "--seq-len", "32", "--max-windows", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] == 2 and result["perplexity"] > 1
    assert main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "4"]) == 0


def test_plan_then_compress_with_plan(tiny_model_dir, tiny_text, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    assert main(list(map(str, ["plan", "--model", tiny_model_dir, "--keep", 0.6, "--calib-file", tiny_text,
                               "--calib-samples", 4, "--seq-len", 32, "--out", plan_file]))) == 0
    plan = json.loads(plan_file.read_text())
    assert plan["method"] == "uniform" and abs(plan["keep_achieved"] - 0.6) < 0.05
    assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--plan", plan_file)))) == 0
    saved = json.loads((tmp_path / "ck" / "rank_plan.json").read_text())
    assert [l["rank"] for l in saved["layers"]] == [l["rank"] for l in plan["layers"]]


@pytest.mark.parametrize("keep", ["0", "1.5", "-0.2", "nan"])
def test_bad_keep(tiny_model_dir, tiny_text, tmp_path, keep):
    res = _run(*_compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--keep", keep))
    assert res.returncode == 1
    assert "keep must be in (0, 1]" in res.stderr or "keep must be" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ck").exists()


def test_unknown_model(tmp_path, tiny_text):
    res = _run(*_compress_args("no-such-model-alias", tiny_text, tmp_path / "ck"), env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 1 and "could not load model 'no-such-model-alias'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "ck").exists()


def test_plan_that_does_not_match(tiny_model_dir, tiny_text, tmp_path):
    plan = uniform_plan({"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (99, 160)}, 0.5)
    plan.save(tmp_path / "plan.json")
    res = _run(*_compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--plan", tmp_path / "plan.json"))
    assert res.returncode == 1 and "model.layers.0.mlp.down_proj" in res.stderr and "99x160" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "ck").exists()


def test_text_too_short(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    res = _run(*_compress_args(tiny_model_dir, short, tmp_path / "ck"))
    assert res.returncode == 1 and "fewer than one window" in res.stderr
    res = _run("eval", tiny_model_dir, "--text-file", short, "--seq-len", 32)
    assert res.returncode == 1 and "fewer than one window" in res.stderr


def test_existing_output_needs_overwrite(tiny_model_dir, tiny_text, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "x").write_text("keep me")
    res = _run(*_compress_args(tiny_model_dir, tiny_text, out))
    assert res.returncode == 1 and "--overwrite" in res.stderr
    assert (out / "x").read_text() == "keep me"


def test_non_finite_weights(tiny_model_dir, tiny_text, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_model_dir / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name][0, 0] = float("nan")
    save_file(weights, tiny_model_dir / "model.safetensors", metadata={"format": "pt"})
    res = _run(*_compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--no-whiten"))
    assert res.returncode == 1 and "model.layers.1.mlp.up_proj" in res.stderr and "NaN" in res.stderr
    assert not (tmp_path / "ck").exists()


def test_corrupted_checkpoint(tiny_model_dir, tiny_text, tmp_path):
    out = tmp_path / "ck"
    assert _run(*_compress_args(tiny_model_dir, tiny_text, out)).returncode == 0
    shard = out / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    res = _run("eval", out, "--text-file", tiny_text, "--seq-len", 32)
    assert res.returncode == 1 and "truncated" in res.stderr and "Traceback" not in res.stderr


def test_help_explains_every_command():
    for command in ["compress", "plan", "eval", "info", "generate"]:
        res = _run(command, "--help")
        assert res.returncode == 0 and "usage: lowrank-infer" in res.stdout
    assert "keep" in _run("--help").stdout


@pytest.mark.parametrize("method", ["uniform", "drank"])
def test_plan_with_multiple_of(tiny_model_dir, tiny_text, tmp_path, method):
    plan_file = tmp_path / "plan.json"
    assert main(list(map(str, ["plan", "--model", tiny_model_dir, "--keep", 0.5, "--method", method,
                               "--multiple-of", 8, "--calib-file", tiny_text, "--calib-samples", 4,
                               "--seq-len", 32, "--out", plan_file]))) == 0
    plan = json.loads(plan_file.read_text())
    assert all(l["rank"] is None or l["rank"] % 8 == 0 for l in plan["layers"])
    assert abs(plan["keep_achieved"] - 0.5) <= 0.005 and plan["params"]["multiple_of"] == 8
