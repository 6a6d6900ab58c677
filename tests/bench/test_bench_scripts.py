"""The scripts in benchmarks/: plots from a kernel JSON (new and old names), the quality suite's commands,
the GPU session script's guard, the loss anatomy's restored layers, the healing schedules' refusals and
held-out score, the healing step timer's paths, the held-out perplexity and the sampler's batch timer."""

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(backend, keep, tokens, speedup, layer="q"):
    return {"backend": backend, "model": "smollm2-135m", "layer": layer, "k": None if keep is None else 100,
            "keep": keep, "tokens": tokens, "speedup_vs_dense": speedup}


def test_plot_writes_pngs(tmp_path):
    rows = [_row("dense", None, t, 1.0) for t in (1, 16)]
    rows += [_row(b, keep, t, s * keep) for b in ("cublas", "triton") for keep in (0.4, 0.8)
             for t, s in ((1, 2.0), (16, 1.5))]
    rows.append({**_row("triton", 0.4, 16, None), "status": "failed: x"})
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"environment": {"device_label": "CPU (x86_64)"}, "dtype": "float32", "rows": rows}))
    plot = _script("plot")
    assert plot.speedups(rows, "triton")[(0.4, 1)] == 0.8
    pngs = plot.main([str(path), "--out-dir", str(tmp_path / "plots")])
    assert [p.name for p in pngs] == ["kernels-vs-keep.png", "kernels-vs-tokens.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


def test_plot_reads_old_files_with_the_new_names():
    plot = _script("plot")
    old = [{"provider": "two_matmul", "keep": 0.6, "tokens": 1, "speedup_vs_dense": 1.5},
           {"provider": "two_matmul", "keep": 0.6, "tokens": 1, "speedup_vs_dense": 6.0},
           {"path": "fused", "keep": 0.6, "tokens": 1, "speedup_vs_dense": 0.5}]
    assert plot.speedups(old, "cublas") == {(0.6, 1): pytest.approx(3.0)}  # geometric mean of 1.5 and 6
    assert plot.speedups(old, "triton") == {(0.6, 1): 0.5}


def test_quality_suite_runs_compress_then_eval(tmp_path, capsys):
    quality = _script("run_quality")
    quality.main(["--model", "smollm2-135m", "--methods", "uniform", "drank", "--keeps", "0.6",
                  "--text-file", "test.txt", "--work-dir", str(tmp_path), "--dry-run"])
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    assert len(commands) == 1 + 2 * 2
    assert commands[0].endswith("eval smollm2-135m --text-file test.txt --seq-len 512 --max-windows 40 --json")
    drank = tmp_path / "smollm2-135m-drank-0.6"
    assert f"compress --model smollm2-135m --keep 0.6 --out {drank} --method drank" in commands[3]
    assert f"eval {drank} --text-file" in commands[4]


def test_quality_suite_applies_plans_and_plain_svd(tmp_path, capsys):
    quality = _script("run_quality")
    (tmp_path / "smollm2-135m_ara_keep0.6.json").write_text("{}")
    quality.main(["--methods", "ara", "uniform-plain", "--keeps", "0.6", "--text-file", "t.txt", "--no-dense",
                  "--plans", str(tmp_path), "--work-dir", str(tmp_path), "--dry-run"])
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    assert f"--plan {tmp_path / 'smollm2-135m_ara_keep0.6.json'}" in commands[0] and "--method" not in commands[0]
    assert commands[2].endswith("--method uniform --no-whiten")


def test_quality_suite_reruns_the_allocator_on_mixed_calibration(tmp_path, capsys):
    """A committed plan was made on text alone: ``ara-mix`` runs ARA again, and so does ``ara-seed1``
    (other windows); ``ara-shrinkauto`` keeps the plan."""
    quality = _script("run_quality")
    (tmp_path / "smollm2-135m_ara_keep0.8.json").write_text("{}")
    quality.main(["--methods", "ara-mix", "ara-shrinkauto", "ara-seed1", "ara-seed2", "--keeps", "0.8", "--text-file", "t.txt",
                  "--no-dense", "--plans", str(tmp_path), "--work-dir", str(tmp_path), "--dry-run"])
    compress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ") and " compress " in line]
    assert compress[0].endswith("--method ara --calib-generated 0.5 --batch-size 32") and "--plan" not in compress[0]
    assert compress[1].endswith(f"--plan {tmp_path / 'smollm2-135m_ara_keep0.8.json'} --shrinkage auto")
    assert compress[2].endswith("--method ara --seed 1") and "--plan" not in compress[2]
    assert compress[3].endswith("--method ara --seed 2") and "--plan" not in compress[3]


def test_quality_suite_stacks_variants_and_refuses_unknown_ones(tmp_path, capsys):
    quality = _script("run_quality")
    quality.main(["--methods", "drank-shrink-seq-refine-heal", "--keeps", "0.8", "--text-file", "t.txt", "--no-dense",
                  "--work-dir", str(tmp_path), "--dry-run"])
    command = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")][0]
    assert command.endswith("--method drank --shrinkage 0.1 --sequential --refine-steps 32 --heal-steps 100")
    quality.main(["--methods", "ara-mix-batch128-calib128-araseq512-arasamples64-arabatch2-araorders2-refine64-heal400-healbatch16-heallr30-healseq512-healtopk256-healwarm100-healwin200", "--keeps", "0.8",
                  "--text-file", "t.txt", "--no-dense", "--work-dir", str(tmp_path), "--plans", str(tmp_path),
                  "--dry-run"])
    command = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")][0]
    assert command.endswith("--method ara --calib-generated 0.5 --batch-size 32 --batch-size 128 --calib-samples 128 "
                            "--param seq_len=512 --param samples=64 --param batch_size=2 --param orders=2 --refine-steps 64 --heal-steps 400 --heal-batch 16 --heal-lr 30e-4 "
                            "--heal-seq-len 512 --heal-top-k 256 --heal-warmup 100 --heal-windows 200")
    known = ("plain, shrink, shrinkauto, seq, mix, short, kl, fp32, refine[N], heal[N], healbatch[N], heallr[N], "
             "healseq[N], healtopk[N], healwarm[N], healwin[N], calib[N], batch[N], arasteps[N], araseq[N], arasamples[N], arabatch[N], araorders[N], seed[N]")
    with pytest.raises(SystemExit, match=re.escape(f"unknown variant 'fast' in 'ara-fast'; known: {known}")):
        quality.main(["--methods", "ara-fast", "--keeps", "0.8", "--text-file", "t.txt", "--no-dense",
                      "--work-dir", str(tmp_path), "--dry-run"])


def test_gpu_session_parses_and_refuses_unknown_stages():
    script = BENCHMARKS / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    result = subprocess.run(["bash", script, "kernels"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown stage 'kernels' (the one stage is v2)" in result.stderr


def test_gpu_quality_parses_and_refuses_unknown_stages():
    script = BENCHMARKS / "gpu_quality.sh"
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    result = subprocess.run(["bash", script, "tune"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: " in result.stderr and "prepare|smoke|sweep" in result.stderr


def test_loss_anatomy_puts_back_exactly_the_dense_layers_of_the_named_types(tmp_path):
    """Restoring every type gives the dense model's outputs; restoring one type leaves the others
    low-rank (checked against the dense model and the saved checkpoint)."""
    import copy

    import torch

    from lowrank_infer import LowRankLinear, UniformConfig, compress, load_compressed, save_compressed
    from tiny_models import tiny_model

    anatomy = _script("loss_anatomy")
    dense = tiny_model("llama").eval()
    compressed = copy.deepcopy(dense)
    compress(compressed, UniformConfig(keep=0.3, whiten=False), progress=False)
    save_compressed(compressed, tmp_path / "ck")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    every = tuple(t for types in anatomy.GROUPS.values() for t in types) + ("v_proj",)
    with torch.no_grad():
        torch.testing.assert_close(anatomy._restored(str(tmp_path / "ck"), dense, every)(ids).logits, dense(ids).logits)
        only_mlp = anatomy._restored(str(tmp_path / "ck"), dense, anatomy.GROUPS["MLP (gate, up, down)"])
        low_rank = {n.rpartition(".")[2] for n, m in only_mlp.named_modules() if isinstance(m, LowRankLinear)}
        assert low_rank == {"q_proj", "k_proj", "v_proj", "o_proj"}
        torch.testing.assert_close(anatomy._nll(load_compressed(tmp_path / "ck", pack=False), ids),
                                   anatomy._nll(compressed, ids))


@pytest.mark.parametrize("argv, message", [
    (["ckpt", "--schedules", "cosine", "--", "--model", "m", "--heal-steps", "4"], "unknown schedule 'cosine'"),
    (["ckpt", "--", "--model", "m", "--keep", "0.8"], "pass --heal-steps N"),
    (["ckpt", "--lrs", "1e-3,fast", "--", "--model", "m", "--heal-steps", "4"], "comma-separated numbers"),
    (["ckpt", "--lrs", "1e-3,0", "--", "--model", "m", "--heal-steps", "4"], "--lrs must be positive"),
    (["ckpt", "--top-ks", "64,1.5", "--", "--model", "m", "--heal-steps", "4"], "--top-ks takes comma-separated"),
    (["ckpt", "--top-ks", "0", "--", "--model", "m", "--heal-steps", "4"], "--top-ks must be positive"),
    (["ckpt", "--warmups", "0,-2", "--", "--model", "m", "--heal-steps", "4"], "--warmups must be non-negative"),
])
def test_heal_schedule_refuses_bad_schedules_rates_and_runs_without_healing(monkeypatch, capsys, argv, message):
    monkeypatch.setattr("sys.argv", ["heal_schedule.py", *argv])
    with pytest.raises(SystemExit, match=message):
        _script("heal_schedule").main()


@pytest.mark.parametrize("compute_dtype, rel", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_heal_step_times_four_paths_of_the_same_loss(tmp_path, monkeypatch, capsys, compute_dtype, rel):
    import copy

    from lowrank_infer import UniformConfig, compress, save_compressed
    from tiny_models import tiny_model

    compressed = copy.deepcopy(tiny_model("llama"))
    compress(compressed, UniformConfig(keep=0.3, whiten=False), progress=False)
    save_compressed(compressed, tmp_path / "ck")
    monkeypatch.setattr("sys.argv", ["heal_step.py", str(tmp_path / "ck"), "--rounds", "2", "--seq-len", "16",
                                     "--compute-dtype", compute_dtype])
    _script("heal_step").main()
    out = capsys.readouterr().out
    losses = {name: float(loss) for name, loss in
              re.findall(r"^(plain|fused|healing, SDPA|healing): [\d.]+ s a step .*loss ([\d.]+)$", out, re.M)}
    assert set(losses) == {"plain", "fused", "healing, SDPA", "healing"} and losses["plain"] > 0
    assert losses["fused"] == pytest.approx(losses["plain"], rel=1e-5)
    assert losses["healing, SDPA"] == pytest.approx(losses["fused"], rel=rel)
    assert losses["healing"] == pytest.approx(losses["healing, SDPA"], rel=rel)
    assert re.search(r"^plain / fused: [\d.]+x, fused / healing, SDPA: [\d.]+x, healing, SDPA / healing: [\d.]+x$",
                     out, re.M)


def test_heal_step_breakdown_sorts_operators_by_kind():
    """One matrix product alone is all "matrix products"; one attention call alone, SDPA's or the
    chunked one's (forward and backward), is all "attention"."""
    import torch.nn.functional as F

    from lowrank_infer.cpu_attention import causal_attention

    breakdown = _script("heal_step")._breakdown
    a = torch.randn(256, 256)
    q = torch.randn(1, 4, 256, 64)
    products = breakdown(lambda: a @ a, 3)
    attention = breakdown(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), 3)
    trained = q.to(torch.bfloat16).requires_grad_()
    chunked = breakdown(lambda: causal_attention(trained, trained, trained, 0.125).sum().backward(), 3)
    assert products["matrix products"] > 0 and products["attention"] == 0
    assert products["matrix products"] >= 0.8 * sum(products.values())
    for kinds in (attention, chunked):
        assert kinds["attention"] > 0 and kinds["matrix products"] == 0
        assert kinds["attention"] >= 0.7 * sum(kinds.values()), kinds


def test_heal_step_breakdown_prints_both_passes(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from lowrank_infer import UniformConfig, compress, load_model, save_compressed

    compressed = load_model(str(tiny_model_dir))[0]
    compress(compressed, UniformConfig(keep=0.3, whiten=False), progress=False)
    save_compressed(compressed, tmp_path / "ck")
    monkeypatch.setattr("sys.argv", ["heal_step.py", str(tmp_path / "ck"), "--rounds", "2", "--seq-len", "16",
                                     "--breakdown", "--dense", str(tiny_model_dir)])
    _script("heal_step").main()
    out = capsys.readouterr().out
    for what in ("healing, SDPA step", "healing step", "dense targets of one step's windows"):
        found = re.search(rf"^{what}: ([\d.]+) s profiled: matrix products ([\d.]+) s \(\d+%\), attention ([\d.]+) s "
                          rf"\(\d+%\), everything else ([\d.]+) s \(\d+%\)$", out, re.M)
        assert found, out
        total, *parts = map(float, found.groups())
        assert total == pytest.approx(sum(parts), abs=2e-3) and parts[0] > 0
    monkeypatch.setattr("sys.argv", ["heal_step.py", str(tmp_path / "ck"), "--dense", str(tiny_model_dir)])
    with pytest.raises(SystemExit):
        _script("heal_step").main()
    assert "--dense profiles the dense targets for --breakdown" in capsys.readouterr().err


def test_held_perplexity_scores_only_the_part_compress_never_fits(tiny_model_dir, tiny_text, capsys):
    """Against a float64 reference computed by hand on the last tenth of the cleaned, tokenized text."""
    import math

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank_infer.data import clean_calibration_text, tokenize_text

    rows = _script("held_perplexity").main([str(tiny_model_dir), "--calib-file", str(tiny_text), "--seq-len", "16",
                                            "--windows", "3"])
    ids = tokenize_text(AutoTokenizer.from_pretrained(tiny_model_dir), clean_calibration_text(tiny_text.read_text()))
    held = ids[ids.numel() - int(ids.numel() * 0.1):][:3 * 16].view(3, 16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = model(held).logits[:, :-1].double()
    reference = math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), held[:, 1:].reshape(-1)).item())
    assert rows == [{"checkpoint": str(tiny_model_dir), "held_perplexity": pytest.approx(reference, abs=1e-3),
                     "windows": 3}]
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["windows"] == 3


def test_heal_schedule_also_scores_the_held_out_part_of_the_calibration_text(tiny_model_dir, tiny_text, monkeypatch,
                                                                            capsys):
    """The held-out text it scores is compress's own split of --calib-file (the part nothing fits)."""
    from transformers import AutoTokenizer

    from lowrank_infer import UniformConfig, compress, save_compressed
    from lowrank_infer.data import calibration_split
    from lowrank_infer.healing import HealReport
    from tiny_models import tiny_model

    compressed = tiny_model("llama")
    compress(compressed, UniformConfig(keep=0.5, whiten=False), progress=False)
    save_compressed(compressed, tiny_model_dir.parent / "ck")
    script = _script("heal_schedule")
    scored = {}

    def perplexity(model, tokens, **kwargs):
        scored[len(scored)] = tokens
        return {"perplexity": float(len(scored))}

    monkeypatch.setattr(script, "TEXTS", {"text": str(tiny_text)})
    monkeypatch.setattr(script, "perplexity", perplexity)
    healed = []
    monkeypatch.setattr(script, "heal", lambda model, train, held, config: healed.append(
        (train.logp.shape[-1], held.index.shape[-1], config.warmup)) or HealReport(2, 0, 1.0, 1.0, 0.0))
    monkeypatch.setattr("sys.argv", ["heal_schedule.py", str(tiny_model_dir.parent / "ck"), "--schedules", "linear",
                                     "--top-ks", "5,3,999", "--warmups", "1",  # 999: more than the tiny vocabulary
                                     "--", "--model", str(tiny_model_dir), "--keep", "0.5", "--method", "uniform",
                                     "--seq-len", "16", "--heal-steps", "2", "--calib-file", str(tiny_text)])
    script.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()[-3:]]
    assert [(row["top_k"], row["text"], row["held"]) for row in rows] == [(5, 1.0, 2.0), (3, 3.0, 4.0), (999, 5.0, 6.0)]
    assert {row["warmup"] for row in rows} == {1}
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert healed == [(5, 5, 1), (3, 3, 1), (min(999, vocab), min(999, vocab), 1)]
    held = calibration_split(str(tiny_text), AutoTokenizer.from_pretrained(tiny_model_dir))[1]
    torch.testing.assert_close(scored[1], held, rtol=0, atol=0)


def test_attention_chunks_times_sdpa_beside_each_chunk_size_and_restores_the_default(monkeypatch, capsys):
    import lowrank_infer.cpu_attention as cpu_attention

    default = cpu_attention.CHUNK_ROWS
    monkeypatch.setattr("sys.argv", ["attention_chunks.py", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
                                     "--seq-len", "24", "--chunks", "8", "24", "--rounds", "2"])
    _script("attention_chunks").main()
    out = capsys.readouterr().out
    rows = re.findall(r"^(SDPA|chunks of \d+): [\d.]+ ms forward and backward \(median of 2\), SDPA / this ([\d.]+)x$",
                      out, re.M)
    assert [name for name, _ in rows] == ["SDPA", "chunks of 8", "chunks of 24"]
    assert float(rows[0][1]) == 1.0
    assert cpu_attention.CHUNK_ROWS == default
    monkeypatch.setattr("sys.argv", ["attention_chunks.py", "--heads", "5", "--kv-heads", "2"])
    with pytest.raises(SystemExit):
        _script("attention_chunks").main()
    assert "--heads a multiple of --kv-heads" in capsys.readouterr().err


def test_generation_speed_times_the_sampler_at_each_batch_size(monkeypatch, capsys):
    from tiny_models import tiny_model, tiny_tokenizer

    from lowrank_infer import cli

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    monkeypatch.setattr(cli, "_load_for_analysis", lambda args: (model, tokenizer, "tiny"))
    monkeypatch.setattr("sys.argv", ["generation_speed.py", "--samples", "5", "--seq-len", "6", "--batch-sizes", "5,2"])
    _script("generation_speed").main()
    out = capsys.readouterr().out
    batches = re.findall(r"^generated_ids, batch (\d+): [\d.]+ s for 5 x 6 tokens \(batch (\d+), tiny", out, re.M)
    assert batches == [("5", "5"), ("2", "2")]
    assert re.search(r"^ratio generated_ids, batch 2 / generated_ids, batch 5: [\d.]+$", out, re.M)
