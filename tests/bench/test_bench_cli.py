"""``lowrank-infer bench kernels|e2e``: quick runs end to end, their JSON, and bad input."""

import argparse
import json
import shlex
import sys

import pytest
import torch

from lowrank_infer.bench.cli import add_bench_parser, cmd_kernels

KERNEL_ROW_KEYS = {
    "backend", "model", "layer", "m", "n", "k", "keep", "keep_achieved", "tokens", "dtype", "timer", "median_ms",
    "gbs", "tflops", "mem_frac", "compute_frac", "roofline_frac", "speedup_vs_dense", "status",
}
E2E_ROW_KEYS = {
    "backend", "method", "keep", "keep_achieved", "packed", "pack_report", "phase", "mode", "batch", "tokens",
    "dtype", "timer", "median_ms", "tokens_per_s", "peak_memory_bytes", "model_params", "model_bytes",
    "speedup_vs_dense", "speedup_vs_eager", "compiled_rel_err", "status",
}
BLOCK_ROW_KEYS = {
    "model", "unit", "form", "tokens", "shapes", "k", "keep", "weight_bytes", "dtype", "backend", "pdl", "timer",
    "median_ms", "gbs", "copy_frac", "speedup_vs_dense", "speedup_vs_separate", "pdl_gain", "status",
}


def _kernels_quick(bench, tmp_path, *extra):
    out = tmp_path / "kernels.json"
    code, err = bench("kernels", "--quick", "--device", "cpu", "--layers", "q", "--tokens", 1, 4,
                      "--rep-ms", 1, "--json", out, *extra)
    assert code == 0, err
    return json.loads(out.read_text())


def test_kernels_quick_writes_json_and_markdown(bench, tmp_path):
    md = tmp_path / "kernels.md"
    doc = _kernels_quick(bench, tmp_path, "--markdown", md)
    assert doc["benchmark"] == "kernels" and doc["dtype"] == "float32" and doc["device"] == "cpu"
    assert doc["environment"]["device_label"].startswith("CPU")
    assert {"torch", "triton", "transformers", "host"} <= doc["environment"].keys()
    assert doc["command"] == shlex.join(sys.orig_argv) and doc["args"]["quick"] is True
    assert doc["peaks"]["bandwidth_gbs"] > 0 and doc["peaks"]["matmul_tflops"] > 0
    rows = doc["rows"]
    assert len(rows) == 2 * 2  # tokens x backends; quick on CPU: smollm2 q at keep 0.6, dense and torch
    for row in rows:
        assert row.keys() >= KERNEL_ROW_KEYS
        assert row["status"] == "ok" and row["median_ms"] > 0 and row["gbs"] > 0 and row["tflops"] > 0
        assert row["model"] == "smollm2-135m" and (row["m"], row["n"]) == (576, 576)
    dense = [r for r in rows if r["backend"] == "dense"]
    assert all(r["k"] is None and r["speedup_vs_dense"] == 1.0 for r in dense)
    lowrank = [r for r in rows if r["backend"] == "torch"]
    assert len(lowrank) == 2 and {r["k"] for r in lowrank} == {int(0.6 * 576 * 576 // 1152)}
    assert lowrank[0]["keep_achieved"] == pytest.approx(172 * 1152 / 576**2)
    assert "| backend |" in md.read_text()


def _wrong(x, U, V):
    return 2 * ((x @ V) @ U.T)


def _raising(x, U, V):
    raise RuntimeError("no kernel image")


@pytest.mark.parametrize(("broken", "status"), [
    (_wrong, "failed: relative error"), (_raising, "failed: RuntimeError: no kernel image"),
])
def test_broken_backend_is_reported_failed_and_not_timed(bench, tmp_path, monkeypatch, broken, status):
    from lowrank_infer.bench import kernels

    calls = []

    def spy(x, U, V):
        calls.append(x.shape[0])
        return broken(x, U, V)

    monkeypatch.setattr(kernels, "lowrank_linear", spy)
    rows = _kernels_quick(bench, tmp_path)["rows"]
    assert calls == [1, 4]  # the correctness check only: a failed backend is never timed
    by_backend = {(r["backend"], r["tokens"]): r for r in rows}
    for tokens in (1, 4):
        assert by_backend[("dense", tokens)]["status"] == "ok"
        row = by_backend[("torch", tokens)]
        assert row["status"].startswith(status)
        assert row["median_ms"] is None and row["speedup_vs_dense"] is None


def _check_e2e_rows(rows, backends):
    assert {r["backend"] for r in rows} == set(backends)
    for row in rows:
        assert row.keys() >= E2E_ROW_KEYS
        assert row["status"] == "ok", row["status"]
        assert row["median_ms"] > 0 and row["tokens_per_s"] > 0 and row["timer"] == "perf_counter"
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    dense_bytes = {r["model_bytes"] for r in rows if r["backend"] == "dense"}
    low_bytes = {r["model_bytes"] for r in rows if r["backend"] != "dense"}
    assert len(dense_bytes) == len(low_bytes) == 1 and low_bytes.pop() < dense_bytes.pop()


def _e2e(bench, tmp_path, *argv):
    out = tmp_path / "e2e.json"
    code, err = bench("e2e", *argv, "--quick", "--device", "cpu", "--rep-ms", 1, "--json", out)
    assert code == 0, err
    return json.loads(out.read_text())


def test_block_quick_writes_json_and_both_tables(bench, tmp_path):
    out, md = tmp_path / "block.json", tmp_path / "block.md"
    code, err = bench("block", "--quick", "--device", "cpu", "--tokens", 1, "--rep-ms", 1, "--json", out,
                      "--markdown", md)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "block" and doc["settings"]["model"] == "smollm2-135m"
    assert doc["args"]["multiple_of"] == 16 and doc["peaks"]["bandwidth_gbs"] > 0
    rows = doc["rows"]
    # 4 distinct shapes alone, q/k/v and gate/up each separate and as one op; dense and torch each.
    assert len(rows) == (4 + 2 * 2) * 2
    for row in rows:
        assert row.keys() >= BLOCK_ROW_KEYS and row["status"] == "ok" and row["pdl"] is None
        assert row["k"] is None or all(k % 16 == 0 for k in row["k"])
    assert {(r["unit"], r["form"]) for r in rows} >= {("qkv", "grouped"), ("gate_up", "gated"), ("down", "single")}
    text = md.read_text()
    assert "### Ratios side by side" in text and "| torch x dense |" in text and "### Every row" in text


def test_a_run_cut_short_leaves_the_rows_it_measured(bench, tmp_path, monkeypatch):
    from lowrank_infer.bench import block

    bench_case, cases = block._bench_case, []

    def stopping(*args):
        if len(cases) == 2:
            raise KeyboardInterrupt  # what a time limit's signal does to the run, in effect
        cases.append(args)
        return bench_case(*args)

    monkeypatch.setattr(block, "_bench_case", stopping)
    out, md = tmp_path / "block.json", tmp_path / "block.md"
    code, _ = bench("block", "--quick", "--device", "cpu", "--tokens", 1, "--rep-ms", 1, "--json", out,
                    "--markdown", md)
    assert code == 130
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and [(r["unit"], r["backend"]) for r in doc["rows"]] == [
        ("q/o", "dense"), ("q/o", "torch")]
    assert doc["rows"][1]["speedup_vs_dense"] > 0
    assert "Partial: the run stopped before its end" in md.read_text()


def test_e2e_shape_only_quick(bench, tmp_path, tiny_config_file):
    md = tmp_path / "e2e.md"
    doc = _e2e(bench, tmp_path, "--shape-only", "--config", tiny_config_file, "--markdown", md)
    assert doc["benchmark"] == "e2e" and doc["shape_only"] and doc["model"] == str(tiny_config_file)
    _check_e2e_rows(doc["rows"], {"dense", "torch"})
    assert {(r["method"], r["keep"]) for r in doc["rows"]} == {("dense", 1.0), ("uniform", 0.6)}
    assert "| backend |" in md.read_text()


def _tiny_plan(tiny_config_file, path, **edit):
    """A non-uniform plan for the tiny config: some layers dense, the rest at assorted ranks."""
    from lowrank_infer.allocation import plan_from_ranks

    shapes = {f"model.layers.{i}.{name}": shape for i in range(2) for name, shape in (
        ("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)), ("self_attn.v_proj", (32, 64)),
        ("self_attn.o_proj", (64, 64)), ("mlp.gate_proj", (160, 64)), ("mlp.up_proj", (160, 64)),
        ("mlp.down_proj", (64, 160)))}
    ranks = {name: None if "mlp" in name and "layers.1" in name else 3 + i for i, name in enumerate(shapes)}
    plan = plan_from_ranks(shapes, ranks, keep=0.55, method="ara", model="tiny")
    for name, shape in edit.items():  # e.g. a layer of another width: the plan no longer fits
        plan.layers[0] = type(plan.layers[0])(plan.layers[0].name, *shape, 3)
    plan.save(path)
    return plan


def test_e2e_shape_only_measures_only_the_plan_beside_dense(bench, tmp_path, tiny_config_file):
    plan = _tiny_plan(tiny_config_file, tmp_path / "plan.json")
    rows = _e2e(bench, tmp_path, "--shape-only", "--config", tiny_config_file, "--plan", tmp_path / "plan.json")["rows"]
    _check_e2e_rows(rows, {"dense", "torch"})
    assert {(r["method"], r["keep"]) for r in rows} == {("dense", 1.0), ("ara", 0.55)}
    assert all(r["keep_achieved"] == pytest.approx(plan.keep_achieved) for r in rows if r["method"] == "ara")


def test_e2e_shape_only_plan_and_keep_together(bench, tmp_path, tiny_config_file):
    _tiny_plan(tiny_config_file, tmp_path / "plan.json")
    rows = _e2e(bench, tmp_path, "--shape-only", "--config", tiny_config_file, "--plan", tmp_path / "plan.json",
                "--keep", 0.7)["rows"]
    assert {(r["method"], r["keep"]) for r in rows} == {("dense", 1.0), ("uniform", 0.7), ("ara", 0.55)}
    uniform = {r["keep_achieved"] for r in rows if r["method"] == "uniform"}
    assert len(uniform) == 1 and 0.695 <= uniform.pop() <= 0.7  # the library's uniform plans keep within 0.005


def test_e2e_compiled_mode_rows_sit_beside_the_eager_ones(bench, tmp_path, tiny_config_file):
    md = tmp_path / "e2e.md"
    doc = _e2e(bench, tmp_path, "--shape-only", "--config", tiny_config_file, "--modes", "compiled", "eager",
               "--markdown", md)
    rows = doc["rows"]
    _check_e2e_rows(rows, {"dense", "torch"})
    assert doc["settings"]["modes"] == ["eager", "compiled"] and doc["partial"] is False
    assert [(r["backend"], r["phase"], r["mode"]) for r in rows] == [
        (b, phase, mode) for b in ("dense", "torch")
        for phase, mode in (("prefill", "eager"), ("decode", "eager"), ("decode", "compiled"))]
    by_case = {(r["backend"], r["phase"], r["mode"]): r for r in rows}
    for backend in ("dense", "torch"):
        compiled, eager = by_case[(backend, "decode", "compiled")], by_case[(backend, "decode", "eager")]
        assert compiled["compiled_rel_err"] < 1e-5 and eager["compiled_rel_err"] is None
        assert compiled["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / compiled["median_ms"])
        assert eager["speedup_vs_eager"] is None
    dense_compiled = by_case[("dense", "decode", "compiled")]["median_ms"]
    torch_compiled = by_case[("torch", "decode", "compiled")]
    assert torch_compiled["speedup_vs_dense"] == pytest.approx(dense_compiled / torch_compiled["median_ms"])
    assert "| x eager | compiled err |" in md.read_text()


def test_e2e_without_dense_has_no_speedups(bench, tmp_path, tiny_config_file):
    rows = _e2e(bench, tmp_path, "--shape-only", "--config", tiny_config_file, "--backends", "torch")["rows"]
    assert {r["backend"] for r in rows} == {"torch"} and all(r["speedup_vs_dense"] is None for r in rows)


def test_e2e_plan_that_does_not_fit_fails_before_timing(bench, tmp_path, tiny_config_file):
    _tiny_plan(tiny_config_file, tmp_path / "plan.json", wrong=(64, 65))
    code, err = bench("e2e", "--shape-only", "--config", tiny_config_file, "--plan", tmp_path / "plan.json",
                      "--quick", "--device", "cpu", "--rep-ms", 1)
    assert code == 1 and err.count("\n") == 1
    assert "model.layers.0.self_attn.q_proj' is 64x65 but the model's is 64x64" in err


def _save_checkpoint(config_file, path, keep):
    """A compressed checkpoint of the tiny config: random weights, the library's uniform plan."""
    from lowrank_infer.allocation import uniform_plan
    from lowrank_infer.bench.e2e import random_factors, random_model
    from lowrank_infer.bench.shapes import hf_config
    from lowrank_infer.io import attach_plan, save_compressed
    from lowrank_infer.structure import target_shapes
    from lowrank_infer.surgery import apply_plan

    model = random_model(hf_config(str(config_file)), torch.device("cpu"), torch.float32)
    plan = uniform_plan(target_shapes(model), keep)
    apply_plan(model, plan, random_factors(model))
    attach_plan(model, plan)
    save_compressed(model, path)


def test_e2e_compressed_checkpoint_against_its_dense_counterpart(bench, tmp_path, tiny_config_file):
    _save_checkpoint(tiny_config_file, tmp_path / "ckpt", 0.5)
    rows = _e2e(bench, tmp_path, tmp_path / "ckpt")["rows"]
    _check_e2e_rows(rows, {"dense", "torch"})
    assert {r["keep"] for r in rows} == {1.0, 0.5}


@pytest.mark.parametrize(("argv", "message"), [
    (["kernels", "--models", "gpt5"], "unknown model 'gpt5' (known: llama2-7b, llama3-8b"),
    (["kernels", "--layers", "qkv"], "unknown layer 'qkv' (known: q, k, v, o"),
    (["kernels", "--backends", "cutlass"], "unknown backend 'cutlass' (known: dense, cublas, triton, triton_fp32, torch)"),
    (["kernels", "--backends", "dense", "triton"], "on cpu, lowrank_linear runs torch math whatever the backend"),
    (["kernels", "--keep", "1.0"], "leaves a 576x576 layer dense"),
    (["kernels", "--keep", "1.5"], "keep must be in (0, 1]"),
    (["kernels", "--layers", "q", "--multiple-of", "1024"], "multiple_of 1024 leaves a 576x576 layer dense"),
    (["kernels", "--multiple-of", "0"], "--multiple-of must be positive"),
    (["kernels", "--json", "."], "--json . is a directory"),
    (["kernels", "--rep-ms", "0"], "--rep-ms must be positive"),
    (["e2e", "--shape-only", "--config", "smollm2-135m", "--markdown", "."], "--markdown . is a directory"),
    (["kernels", "--tokens", "0"], "--tokens must be positive"),
    (["e2e", "--shape-only", "--config", "gpt5"], "unknown config 'gpt5'"),
    (["e2e", "--shape-only"], "--shape-only needs --config"),
    (["e2e"], "give a compressed model directory, or --shape-only"),
    (["e2e", "some-dir", "--plan", "p.json"], "--config, --keep and --plan apply to --shape-only"),
    (["e2e", "--shape-only", "--config", "smollm2-135m", "--plan", "missing.json"], "rank plan file not found"),
    (["e2e", "--shape-only", "--config", "smollm2-135m", "--keep", "0.001"], "below the smallest plan possible"),
    (["e2e", "--shape-only", "--config", "smollm2-135m", "--backends", "cublas"], "would time torch under another"),
    (["block", "--model", "gpt5"], "unknown model 'gpt5' (known: llama2-7b"),
    (["block", "--keep", "1.0"], "leaves a 576x576 layer dense"),
    (["block", "--multiple-of", "1024"], "multiple_of 1024 leaves a 576x576 layer dense"),
    (["block", "--backends", "dense", "triton"], "on cpu, lowrank_linear runs torch math whatever the backend"),
    (["block", "--tokens", "0"], "--tokens must be positive"),
])
def test_bad_input_is_one_line_error(bench, argv, message):
    code, err = bench(*argv, "--device", "cpu")
    assert code == 1
    assert err.startswith("lowrank-infer bench: error: ") and message in err and err.count("\n") == 1


def test_e2e_rejects_a_directory_that_is_not_a_compressed_model(bench, tmp_path, tiny_config_file):
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(tiny_config_file.read_text())
    for path in (tmp_path / "dense", tmp_path / "missing"):
        code, err = bench("e2e", path, "--device", "cpu")
        assert code == 1 and "is not a lowrank_infer compressed model directory" in err


def test_e2e_rejects_a_checkpoint_with_no_low_rank_layer(bench, tmp_path, tiny_config_file):
    _save_checkpoint(tiny_config_file, tmp_path / "ck", 1.0)
    code, err = bench("e2e", tmp_path / "ck", "--device", "cpu")
    assert code == 1 and "keeps every layer dense: there is no low-rank model to compare" in err


def test_e2e_model_larger_than_free_memory_fails_before_timing(bench, tiny_config_file, monkeypatch):
    from lowrank_infer.bench import e2e

    monkeypatch.setattr(e2e, "available_memory", lambda device: 1000)
    monkeypatch.setattr(e2e, "run_e2e_bench", lambda *a: pytest.fail("timed a model that cannot fit"))
    code, err = bench("e2e", "--shape-only", "--config", tiny_config_file, "--device", "cpu")
    assert code == 1 and "in float32 needs" in err and "GiB free on cpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", [["kernels"], ["e2e", "--shape-only", "--config", "smollm2-135m"]])
def test_cuda_without_gpu_is_an_error(bench, command):
    code, err = bench(*command, "--device", "cuda")
    assert code == 1 and "--device cuda requested but no CUDA GPU is available" in err


def test_add_bench_parser_plugs_into_the_main_parser():
    parser = argparse.ArgumentParser(prog="lowrank-infer")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "kernels", "--quick", "--keep", "0.4", "0.6", "--tokens", "1", "16"])
    assert args.command == "bench" and args.bench_command == "kernels" and args.run is cmd_kernels
    assert args.keep == [0.4, 0.6] and args.tokens == [1, 16] and args.quick
