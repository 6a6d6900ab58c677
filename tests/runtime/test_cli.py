"""The ``lowrank-infer`` command on a tiny local model: happy paths and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowrank_infer.allocation import RankPlan, uniform_plan
from lowrank_infer.cli import main


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (exit code, stderr)`` through ``main`` in this process."""

    def run(*argv):
        code = main([str(a) for a in argv])
        return code, capsys.readouterr().err

    return run


def _one_line_error(code, err, *words):
    """Exit code 1 and one error line naming the problem (after any progress bars of loading)."""
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err and last.startswith("lowrank-infer "), err
    for word in words:
        assert word in last, err


def _usage_error(capsys, argv, words) -> None:
    """argparse's own refusal: exit code 2 and its message on stderr."""
    with pytest.raises(SystemExit) as caught:
        main([str(a) for a in argv])
    assert caught.value.code == 2 and words in capsys.readouterr().err


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
def test_bad_keep(cli, tiny_model_dir, tiny_text, tmp_path, keep):
    _one_line_error(*cli(*_compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--keep", keep)), "keep must be")
    assert not (tmp_path / "ck").exists()


def test_unknown_model(cli, tmp_path, tiny_text):
    _one_line_error(*cli(*_compress_args(tmp_path / "no-such-model", tiny_text, tmp_path / "ck")),
                    "could not load model", "no-such-model")
    assert not (tmp_path / "ck").exists()


def test_plan_that_does_not_match(cli, tiny_model_dir, tiny_text, tmp_path):
    plan = uniform_plan({"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (99, 160)}, 0.5)
    plan.save(tmp_path / "plan.json")
    _one_line_error(*cli(*_compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--plan", tmp_path / "plan.json")),
                    "model.layers.0.mlp.down_proj", "99x160")
    assert not (tmp_path / "ck").exists()


def test_text_too_short(cli, tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _one_line_error(*cli(*_compress_args(tiny_model_dir, short, tmp_path / "ck")), "fewer than the 4 x 32 requested")
    _one_line_error(*cli("eval", tiny_model_dir, "--text-file", short, "--seq-len", 32), "fewer than one window")


def test_unk_markers_leave_too_few_tokens(cli, tiny_model_dir, tmp_path):
    """A word-level text whose words are mostly <unk>: after cleaning, what is left is counted."""
    text = tmp_path / "unk.txt"
    text.write_text("the <unk> <unk> of <unk> " * 12)  # 288 characters, 96 tokens once cleaned
    _one_line_error(*cli(*_compress_args(tiny_model_dir, text, tmp_path / "ck")),
                    "once <unk> markers and the held-out 10% are set aside", "4 x 32 requested")


def test_heal_steps_train_the_factors_and_report(tiny_model_dir, tiny_text, tmp_path, capsys):
    out = tmp_path / "ck"
    code = main(list(map(str, _compress_args(tiny_model_dir, tiny_text, out, "--keep", 0.5, "--heal-steps", 3,
                                             "--heal-seq-len", 32, "--heal-lr", 1e-3))))
    assert code == 0
    printed = capsys.readouterr().out
    assert "healing: " in printed and "held-out KL" in printed


def test_refine_and_heal_steps_are_recorded_in_the_checkpoint(tiny_model_dir, tiny_text, tmp_path, capsys):
    out = tmp_path / "ck"
    code = main(list(map(str, _compress_args(tiny_model_dir, tiny_text, out, "--keep", 0.5, "--refine-steps", 2,
                                             "--heal-steps", 2, "--heal-seq-len", 32))))
    assert code == 0
    assert "refinement: " in capsys.readouterr().out
    params = RankPlan.load(out / "rank_plan.json").params
    assert params["refine"]["steps"] == 2 and len(params["refine"]["held_error_after"]) == 2
    assert params["heal"]["steps"] == 2 and params["heal"]["held_kl_after"] <= params["heal"]["held_kl_before"]


def test_heal_batch_sets_the_windows_per_step_and_the_windows_recorded(tiny_model_dir, tiny_text, tmp_path,
                                                                       monkeypatch):
    """Healing records the dense targets of steps x batch training windows, at most HEAL_MAX_WINDOWS."""
    import lowrank_infer.cli as cli_module
    recorded = []
    real_targets = cli_module.teacher_targets
    monkeypatch.setattr(cli_module, "teacher_targets", lambda model, ids, **kw: recorded.append(len(ids)) or
                        real_targets(model, ids, **kw))
    out = tmp_path / "ck"
    assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, out, "--keep", 0.5, "--heal-steps", 2,
                                             "--heal-batch", 3, "--heal-seq-len", 32)))) == 0
    assert recorded == [6, cli_module.HEAL_HELD_WINDOWS]
    assert RankPlan.load(out / "rank_plan.json").params["heal"]["batch"] == 3
    monkeypatch.setattr(cli_module, "HEAL_MAX_WINDOWS", 4)
    recorded.clear()
    assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, tmp_path / "ck2", "--keep", 0.5,
                                             "--heal-steps", 2, "--heal-batch", 3, "--heal-seq-len", 32)))) == 0
    assert recorded == [4, cli_module.HEAL_HELD_WINDOWS]


def test_heal_top_k_sets_the_dense_tokens_matched_and_is_recorded(tiny_model_dir, tiny_text, tmp_path, monkeypatch):
    import lowrank_infer.cli as cli_module
    shapes = []
    real_heal = cli_module.heal
    monkeypatch.setattr(cli_module, "heal", lambda model, train, held, config, **kw: shapes.append(
        (train.logp.shape[-1], held.index.shape[-1])) or real_heal(model, train, held, config, **kw))
    for top_k, out in ((None, tmp_path / "a"), (7, tmp_path / "b")):
        extra = () if top_k is None else ("--heal-top-k", top_k)
        assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, out, "--keep", 0.5, "--heal-steps", 2,
                                                 "--heal-seq-len", 32, *extra)))) == 0
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert shapes == [(min(cli_module.HEAL_TOP_K, vocab),) * 2, (7, 7)]  # never more tokens than the vocabulary
    assert [RankPlan.load(tmp_path / d / "rank_plan.json").params["heal"]["top_k"] for d in "ab"] == [
        cli_module.HEAL_TOP_K, 7]


def test_heal_schedule_and_warmup_reach_the_schedule_and_are_recorded(tiny_model_dir, tiny_text, tmp_path,
                                                                      monkeypatch):
    import lowrank_infer.cli as cli_module
    configs = []
    real_heal = cli_module.heal
    monkeypatch.setattr(cli_module, "heal", lambda model, train, held, config, **kw: configs.append(config) or
                        real_heal(model, train, held, config, **kw))
    runs = ((), ("--heal-schedule", "constant", "--heal-warmup", 2))
    for extra, out in zip(runs, (tmp_path / "a", tmp_path / "b")):
        assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, out, "--keep", 0.5, "--heal-steps", 3,
                                                 "--heal-seq-len", 32, *extra)))) == 0
    assert [c.decay for c in configs] == [True, False]
    assert [c.warmup for c in configs] == [0, 2]
    heal = [RankPlan.load(tmp_path / d / "rank_plan.json").params["heal"] for d in "ab"]
    assert [h["schedule"] for h in heal] == ["linear", "constant"]
    assert [h["warmup"] for h in heal] == [0, 2]


def test_healing_windows_are_as_long_as_the_calibration_windows_by_default(tiny_model_dir, tiny_text, tmp_path,
                                                                            monkeypatch):
    import lowrank_infer.cli as cli_module
    shapes = []
    real_targets = cli_module.teacher_targets
    monkeypatch.setattr(cli_module, "teacher_targets", lambda model, ids, **kw: shapes.append(tuple(ids.shape)) or
                        real_targets(model, ids, **kw))
    assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--keep", 0.5,
                                             "--heal-steps", 2)))) == 0
    assert shapes == [(2 * cli_module.HEAL_BATCH, 32), (cli_module.HEAL_HELD_WINDOWS, 32)]  # --seq-len 32


def test_heal_windows_sets_how_many_windows_get_targets_and_is_recorded(tiny_model_dir, tiny_text, tmp_path,
                                                                        monkeypatch):
    import lowrank_infer.cli as cli_module
    calls = []
    real_heal = cli_module.heal
    monkeypatch.setattr(cli_module, "heal", lambda model, train, held, config, **kw: calls.append((train, config)) or
                        real_heal(model, train, held, config, **kw))
    assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--keep", 0.5,
                                             "--heal-steps", 5, "--heal-windows", 2)))) == 0
    [(train, config)] = calls
    assert train.ids.shape == (2, 32) and len({tuple(w.tolist()) for w in train.ids}) == 2
    assert config.steps == 5  # the steps cycle through the 2 windows (test_healing checks the order)
    assert RankPlan.load(tmp_path / "ck" / "rank_plan.json").params["heal"]["windows"] == 2


def test_healing_trains_on_each_generated_window_once_and_on_text_for_the_rest(tiny_model_dir, tiny_text, tmp_path,
                                                                              monkeypatch):
    """``--calib-generated 0.5 --calib-samples 4``: the model samples 2 fitting windows; 6 healing
    windows take those 2 once each and 4 of the text, where reusing them would repeat windows."""
    import lowrank_infer.cli as cli_module
    from transformers import AutoTokenizer

    from lowrank_infer.data import split_held_out, tokenize_text

    recorded = []
    real_targets = cli_module.teacher_targets
    monkeypatch.setattr(cli_module, "teacher_targets", lambda model, ids, **kw: recorded.append(ids) or
                        real_targets(model, ids, **kw))
    assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--keep", 0.5,
                                             "--calib-generated", 0.5, "--heal-steps", 6)))) == 0
    train = recorded[0]
    fit = split_held_out(tokenize_text(AutoTokenizer.from_pretrained(tiny_model_dir), tiny_text.read_text()))[0]
    in_text = [any(torch.equal(w, fit[i:i + len(w)]) for i in range(len(fit) - len(w) + 1)) for w in train]
    assert train.shape == (6, 32) and sum(in_text) == 4
    assert len({tuple(w.tolist()) for w in train}) == 6


@pytest.mark.parametrize("compute_dtype", ["auto", "bfloat16"])
def test_the_compute_dtype_is_recorded_by_every_stage_it_runs(tiny_model_dir, tiny_text, tmp_path, compute_dtype):
    """ARA, refinement and healing record the dtype they ran in (``auto`` is float32 in the tests,
    see conftest)."""
    out = tmp_path / compute_dtype
    assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, out, "--keep", 0.5, "--method", "ara",
                                             "--param", "steps=2", "--calib-generated", 0.5, "--refine-steps", 2,
                                             "--heal-steps", 2, "--heal-seq-len", 32,
                                             "--compute-dtype", compute_dtype)))) == 0
    params = RankPlan.load(out / "rank_plan.json").params
    expected = "float32" if compute_dtype == "auto" else "bfloat16"
    assert [params["compute_dtype"], params["refine"]["compute_dtype"], params["heal"]["compute_dtype"]] == [expected] * 3


def test_shrinkage_changes_the_factors_and_is_recorded(tiny_model_dir, tiny_text, tmp_path):
    plain, shrunk = tmp_path / "plain", tmp_path / "shrunk"
    assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, plain, "--keep", 0.5)))) == 0
    assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, shrunk, "--keep", 0.5,
                                             "--shrinkage", 0.2)))) == 0
    assert RankPlan.load(shrunk / "rank_plan.json").params["shrinkage"] == 0.2
    assert "shrinkage" not in RankPlan.load(plain / "rank_plan.json").params
    a, b = (load_file(str(d / "model.safetensors")) for d in (plain, shrunk))
    factors = [k for k in a if k.endswith(".V")]
    assert factors and any(not torch.allclose(a[k], b[k]) for k in factors if a[k].shape == b[k].shape)


@pytest.mark.parametrize("plan_first", [False, True])
def test_automatic_shrinkage_records_its_choices(tiny_model_dir, tiny_text, tmp_path, plan_first):
    """``--shrinkage auto``, with an allocator or a plan: every layer's strength comes from the
    grid and the plan counts them; the factors are those of a whitened SVD at that strength."""
    from lowrank_infer.factorize import SHRINKAGE_GRID

    out, extra = tmp_path / "auto", ["--keep", 0.5]
    if plan_first:
        assert main(["plan", "--model", str(tiny_model_dir), "--keep", "0.5", "--calib-file", str(tiny_text),
                     "--calib-samples", "4", "--seq-len", "32", "--out", str(tmp_path / "p.json")]) == 0
        extra = ["--plan", tmp_path / "p.json"]
    assert main(list(map(str, _compress_args(tiny_model_dir, tiny_text, out, *extra, "--shrinkage", "auto")))) == 0
    plan = RankPlan.load(out / "rank_plan.json")
    chosen = plan.params["shrinkage_chosen"]
    assert plan.params["shrinkage"] == "auto" and set(map(float, chosen)) <= set(SHRINKAGE_GRID)
    assert sum(chosen.values()) == sum(rank is not None for rank in plan.ranks.values())


@pytest.mark.parametrize("extra, words", [
    (("--shrinkage", 1.0), "shrinkage must be a number in [0, 1) or 'auto'"),
    (("--shrinkage", "auto", "--calib-samples", 1), "needs calibration windows in both halves"),
    (("--shrinkage", 0.1, "--no-whiten"), "shrinkage applies to whitening"),
])
def test_bad_shrinkage(cli, tiny_model_dir, tiny_text, tmp_path, extra, words):
    _one_line_error(*cli(*_compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", *extra)), words)


def test_plan_refuses_the_stages_that_change_factors_only(cli, tiny_model_dir, tiny_text, tmp_path):
    for flag in (("--sequential",), ("--refine-steps", 4)):
        _one_line_error(*cli("plan", "--model", tiny_model_dir, "--calib-file", tiny_text, "--out",
                             tmp_path / "p.json", *flag), "change the factors, not the ranks")


@pytest.mark.parametrize("extra, words", [
    (("--refine-steps", -1), "refine_steps must be an integer >= 0"),
    (("--heal-steps", -1), "--heal-steps must be >= 0"),
    (("--heal-steps", 2, "--weights-on-disk"), "--heal-steps trains the whole model"),
    (("--heal-steps", 2, "--heal-seq-len", 4000), "fewer than 8 windows of 4000 tokens (--heal-seq-len)"),
    (("--heal-steps", 2, "--heal-warmup", 3), "--heal-warmup must be from 0 to --heal-steps (2), got 3"),
    (("--heal-warmup", 1), "--heal-warmup must be from 0 to --heal-steps (0), got 1"),
    (("--heal-steps", 2, "--heal-warmup", -1), "--heal-warmup must be from 0 to --heal-steps (2), got -1"),
    (("--heal-steps", 2, "--heal-windows", 3), "--heal-windows 3 is more than the 2 windows healing trains on"),
])
def test_bad_heal_settings(cli, tiny_model_dir, tiny_text, tmp_path, extra, words):
    _one_line_error(*cli(*_compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", *extra)), words)


def test_heal_windows_must_be_positive(capsys, tiny_model_dir, tiny_text, tmp_path):
    _usage_error(capsys, _compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--heal-steps", 2,
                                        "--heal-windows", 0),
                 "argument --heal-windows: invalid _positive_int value: '0'")


def test_existing_output_needs_overwrite(cli, tiny_model_dir, tiny_text, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "x").write_text("keep me")
    _one_line_error(*cli(*_compress_args(tiny_model_dir, tiny_text, out)), "--overwrite")
    assert (out / "x").read_text() == "keep me"


def test_non_finite_weights(cli, tiny_model_dir, tiny_text, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_model_dir / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name][0, 0] = float("nan")
    save_file(weights, tiny_model_dir / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(*cli(*_compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--no-whiten")),
                    "model.layers.1.mlp.up_proj", "NaN")
    assert not (tmp_path / "ck").exists()


def test_corrupted_checkpoint(cli, tiny_model_dir, tiny_text, tmp_path):
    out = tmp_path / "ck"
    assert cli(*_compress_args(tiny_model_dir, tiny_text, out))[0] == 0
    shard = out / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _one_line_error(*cli("eval", out, "--text-file", tiny_text, "--seq-len", 32), "truncated")


def test_help_explains_every_command(capsys):
    for command in ["compress", "plan", "eval", "lm-eval", "info", "generate", "bench"]:
        with pytest.raises(SystemExit) as caught:
            main([command, "--help"])
        assert caught.value.code == 0 and f"usage: lowrank-infer {command}" in capsys.readouterr().out


def test_the_installed_command_runs_and_reports_errors_in_one_line(tmp_path):
    """The console entry point itself, in a subprocess, as a user runs it."""
    command = [sys.executable, "-m", "lowrank_infer.cli"]
    env = {k: v for k, v in os.environ.items() if k != "LOWRANK_INFER_DEBUG"}
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "keep" in shown.stdout
    failed = subprocess.run([*command, "compress", "--keep", "2", "--out", str(tmp_path / "ck")],
                            capture_output=True, text=True, env=env)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == ["lowrank-infer compress: error: keep must be in (0, 1] "
                                                  "(fraction of target-linear parameters kept), got 2.0"]


@pytest.mark.parametrize("method", ["uniform", "drank"])
def test_plan_with_multiple_of(tiny_model_dir, tiny_text, tmp_path, method):
    plan_file = tmp_path / "plan.json"
    assert main(list(map(str, ["plan", "--model", tiny_model_dir, "--keep", 0.5, "--method", method,
                               "--multiple-of", 8, "--calib-file", tiny_text, "--calib-samples", 4,
                               "--seq-len", 32, "--out", plan_file]))) == 0
    plan = json.loads(plan_file.read_text())
    assert all(l["rank"] is None or l["rank"] % 8 == 0 for l in plan["layers"])
    assert abs(plan["keep_achieved"] - 0.5) <= 0.005 and plan["params"]["multiple_of"] == 8


@pytest.mark.parametrize(("params", "words"), [
    (["--method", "drank", "--param", "foo=1"], ["method 'drank' takes no parameter 'foo'", "beta, candidates"]),
    (["--method", "drank", "--param", "beta=abc"], ["beta must be 'auto' or a number in [0, 1), got 'abc'"]),
    (["--method", "ara", "--param", "steps=1.5"], ["steps=1.5 should be like its default 100"]),
    (["--param", "foo=1"], ["method 'uniform' takes no parameter 'foo'"]),
])
def test_bad_method_parameters_fail_before_any_work(cli, tiny_text, tmp_path, params, words):
    # A model that does not exist: the check must come before the model is even loaded.
    code, err = cli(*_compress_args(tmp_path / "no-model", tiny_text, tmp_path / "ck", *params))
    _one_line_error(code, err, *words)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize(("argv", "words"), [
    (["--seq-len", "0"], ["--seq-len must be >= 2"]),
    (["--seq-len", "1"], ["--seq-len must be >= 2"]),
    (["--seq-len", "300"], ["seq_len 300 is longer than the model's 256 positions"]),
])
def test_eval_window_errors(cli, tiny_model_dir, tiny_text, argv, words):
    _one_line_error(*cli("eval", tiny_model_dir, "--text-file", tiny_text, *argv), *words)


@pytest.mark.parametrize("flag", ["--batch-size", "--max-windows"])
def test_eval_counts_must_be_positive(capsys, tiny_model_dir, tiny_text, flag):
    _usage_error(capsys, ["eval", tiny_model_dir, "--text-file", tiny_text, "--seq-len", 32, flag, 0],
                 f"argument {flag}: invalid _positive_int value: '0'")


def test_calibration_longer_than_the_model_positions(cli, tiny_model_dir, tiny_text, tmp_path):
    argv = _compress_args(tiny_model_dir, tiny_text, tmp_path / "ck")
    argv[argv.index("--seq-len") + 1] = 300
    _one_line_error(*cli(*argv), "seq_len 300 is longer than the model's 256 positions")
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("tokens, accepted", [(142, True), (141, False)])
def test_calibration_text_of_exactly_the_requested_size(cli, tiny_model_dir, tmp_path, tokens, accepted):
    """4 windows of 32 need 128 tokens once the last 10 % is held out: 142 give 128 + 14, 141 one short."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tmp_path / "exact.txt"
    words = "the of and to in is was for on as with by at from his her an which it were are".split()
    text.write_text(" ".join(words[i % len(words)] for i in range(200)))
    ids = tokenizer(text.read_text(), add_special_tokens=False).input_ids[:tokens]
    text.write_text(tokenizer.decode(ids))
    assert len(tokenizer(text.read_text(), add_special_tokens=False).input_ids) == tokens
    code, err = cli(*_compress_args(tiny_model_dir, text, tmp_path / "ck"))
    if accepted:
        assert code == 0, err
    else:
        _one_line_error(code, err, "leaves 127 tokens", "fewer than the 4 x 32 requested")


def test_out_paths_that_cannot_be_written_fail_first(cli, tiny_model_dir, tiny_text, tmp_path):
    _one_line_error(*cli(*_compress_args(tmp_path / "no-model", tiny_text, tiny_text, "--overwrite")),
                    "exists and is not a directory")
    plan_argv = ["plan", "--model", tmp_path / "no-model", "--calib-file", tiny_text, "--out"]
    _one_line_error(*cli(*plan_argv, tmp_path), "is a directory; give the path of a JSON file")
    _one_line_error(*cli(*plan_argv, tiny_text), "exists (pass --overwrite to replace it)")


def test_flags_that_disagree_with_the_plan(cli, tiny_model_dir, tiny_text, tmp_path):
    plan = uniform_plan({"model.layers.0.self_attn.q_proj": (64, 64)}, 0.5)
    plan.save(tmp_path / "plan.json")
    argv = _compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--plan", tmp_path / "plan.json")
    _one_line_error(*cli(*argv, "--keep", 0.9), "keep 0.9 disagrees with the plan's keep 0.5")
    _one_line_error(*cli(*argv, "--method", "ara"), "method ara disagrees with the plan's method 'uniform'")
    _one_line_error(*cli(*argv, "--param", "beta=0.1"), "method 'uniform' takes no parameter 'beta'")
    _one_line_error(*cli(*argv[:-2], "--plan", _drank_plan(tmp_path), "--param", "beta=0.1"),
                    "beta=0.1 has no effect with a plan")
    code, err = cli(*argv, "--keep", 0.5, "--method", "uniform")  # agreeing flags are fine
    assert code == 0, err


def _drank_plan(tmp_path):
    """A one-layer D-Rank plan made with the paper's beta."""
    plan = uniform_plan({"model.layers.0.self_attn.q_proj": (64, 64)}, 0.5)
    plan = RankPlan(plan.layers, keep_target=0.5, method="drank", params={"beta": 0.3})
    plan.save(tmp_path / "drank.json")
    return tmp_path / "drank.json"


def test_generate_refuses_an_empty_prompt(cli, tiny_model_dir):
    _one_line_error(*cli("generate", tiny_model_dir, "--prompt", " "), "--prompt is empty")


def test_bad_device_is_named(cli, tiny_text, tmp_path):
    _one_line_error(*cli(*_compress_args(tmp_path / "no-model", tiny_text, tmp_path / "ck", "--device", "foo")),
                    "--device 'foo' is not a device")


def test_generated_calibration_needs_no_data(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    code = main(list(map(str, _compress_args(tiny_model_dir, "generated", out, "--keep", 0.5))))
    assert code == 0 and (out / "rank_plan.json").is_file()


def test_generated_calibration_heals_on_its_own_windows(tiny_model_dir, tmp_path):
    out = tmp_path / "ck"
    code = main(list(map(str, _compress_args(tiny_model_dir, "generated", out, "--keep", 0.5, "--heal-steps", 2,
                                             "--heal-seq-len", 16))))
    assert code == 0
    params = json.loads((out / "rank_plan.json").read_text())["params"]
    assert params["heal"]["steps"] == 2 and params["calib_generated"] == 1.0


def test_healing_windows_cannot_outgrow_the_generated_ones(cli, tiny_model_dir, tmp_path):
    _one_line_error(*cli(*_compress_args(tiny_model_dir, "generated", tmp_path / "ck", "--heal-steps", 2,
                                         "--heal-seq-len", 256)),
                    "--heal-seq-len 256 is longer than the generated calibration windows (--seq-len 32)")


def test_mixed_calibration_interleaves_text_and_the_models_own_windows(tiny_model_dir, tiny_text, tmp_path, monkeypatch):
    """``--calib-generated 0.5``: half of the whitening windows come from the fitting part of the
    text and half are the model's samples under --seed; the held-out windows likewise, from the
    held-out tail and from the samples after them (both parts are sampled in one call)."""
    import lowrank_infer.cli as cli_module
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank_infer.data import generated_ids, split_held_out, tokenize_text

    seen = {}
    real = cli_module.analyze
    monkeypatch.setattr(cli_module, "analyze", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    assert main(["plan", "--model", str(tiny_model_dir), "--method", "drank", "--keep", "0.5", "--calib-file",
                 str(tiny_text), "--calib-generated", "0.5", "--calib-samples", "4", "--seq-len", "32", "--seed", "5",
                 "--out", str(tmp_path / "p.json")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    fit, held = split_held_out(tokenize_text(tokenizer, tiny_text.read_text()))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    both = generated_ids(model, tokenizer, 4, 32, seed=5, batch_size=8)
    sampled = {"fit": both[:2], "held": both[2:]}

    def inside(window, stream):
        return any(torch.equal(window, stream[i:i + len(window)]) for i in range(len(stream) - len(window) + 1))

    for ids, stream, part in ((seen["calib_ids"], fit, "fit"), (seen["select_ids"], held, "held")):
        assert ids.shape == (4, 32)
        # Interleaved (text, generated, text, generated): any prefix holds both kinds.
        assert inside(ids[0], stream) and inside(ids[2], stream)
        assert torch.equal(ids[1::2], sampled[part])
    assert not torch.equal(sampled["fit"], sampled["held"])
    assert json.loads((tmp_path / "p.json").read_text())["params"]["calib_generated"] == 0.5


def test_short_generated_samples_fill_the_windows_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    """``--calib-sample-len 16`` with windows of 32: each window is two of the model's 16-token
    samples under --seed, in order, and the plan records the length."""
    import lowrank_infer.cli as cli_module
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank_infer.data import generated_ids

    seen = {}
    real = cli_module.analyze
    monkeypatch.setattr(cli_module, "analyze", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    assert main(["plan", "--model", str(tiny_model_dir), "--method", "uniform", "--keep", "0.5", "--calib-file",
                 "generated", "--calib-sample-len", "16", "--calib-samples", "2", "--seq-len", "32", "--seed", "5",
                 "--out", str(tmp_path / "p.json")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    short = generated_ids(model, AutoTokenizer.from_pretrained(tiny_model_dir), 8, 16, seed=5, batch_size=8)
    assert torch.equal(seen["calib_ids"], short[:4].reshape(2, 32))  # the fit rows come first
    assert json.loads((tmp_path / "p.json").read_text())["params"]["calib_sample_len"] == 16


def test_a_sample_length_without_generated_windows_is_refused(cli, tiny_model_dir, tiny_text, tmp_path):
    _one_line_error(*cli(*_compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--calib-sample-len", 16)),
                    "--calib-sample-len sets the length of generated samples, and none are generated")


def test_generated_calibration_file_contradicts_a_mix(cli, tiny_model_dir, tmp_path):
    _one_line_error(*cli(*_compress_args(tiny_model_dir, "generated", tmp_path / "ck", "--calib-generated", 0.5)),
                    "--calib-file generated samples every window, which contradicts --calib-generated 0.5")


def test_calib_generated_must_be_a_fraction(capsys, tiny_model_dir, tiny_text, tmp_path):
    _usage_error(capsys, _compress_args(tiny_model_dir, tiny_text, tmp_path / "ck", "--calib-generated", "1.5"),
                 "argument --calib-generated: invalid _fraction value: '1.5'")


def test_allocator_choices_are_made_on_held_out_windows(tiny_model_dir, tiny_text, tmp_path, monkeypatch):
    """``plan --method drank`` (beta auto): the scoring windows lie in the held-out last 10 % of
    the calibration text, the whitening windows before it."""
    import lowrank_infer.cli as cli_module
    from transformers import AutoTokenizer

    from lowrank_infer.data import split_held_out, tokenize_text

    seen = {}
    real = cli_module.analyze
    monkeypatch.setattr(cli_module, "analyze", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    assert main(["plan", "--model", str(tiny_model_dir), "--method", "drank", "--keep", "0.5", "--calib-file",
                 str(tiny_text), "--calib-samples", "4", "--seq-len", "32", "--out", str(tmp_path / "p.json")]) == 0
    tokens = tokenize_text(AutoTokenizer.from_pretrained(tiny_model_dir), tiny_text.read_text())
    fit, held = split_held_out(tokens)

    def inside(window, stream):
        return any(torch.equal(window, stream[i:i + len(window)]) for i in range(len(stream) - len(window) + 1))

    assert seen["select_ids"].shape == (4, 32) and all(inside(w, held) for w in seen["select_ids"])
    assert all(inside(w, fit) for w in seen["calib_ids"])
