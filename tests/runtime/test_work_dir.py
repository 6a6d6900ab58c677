"""Streaming compression through a work directory: same result as in memory, and a run killed
after any block resumes to the same checkpoint."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from lowrank_infer.allocation import DRankConfig, UniformConfig
from lowrank_infer.calibration import calibrate
from lowrank_infer.compress import analyze, compress
from lowrank_infer.factorize import whitened_svd
from lowrank_infer.io import save_compressed
from lowrank_infer.structure import target_linears
from lowrank_infer.workdir import WorkDir
from tiny_models import tiny_config

BLOCKS = 4
spectra_module = importlib.import_module("lowrank_infer.spectra")


def _model():
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = BLOCKS
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _ids(samples=6, seq_len=24):
    return torch.randint(3, 128, (samples, seq_len), generator=torch.Generator().manual_seed(1))


def _weights(model, path):
    save_compressed(model, path)
    return load_file(path / "model.safetensors")


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class _Crash(Exception):
    pass


@pytest.mark.parametrize("config", [UniformConfig(keep=0.6), DRankConfig(keep=0.6, beta=0.2)],
                         ids=["uniform", "drank"])
def test_streaming_equals_all_statistics_at_once(config, tmp_path):
    """Reference: every layer's XᵀX first (``calibrate``), then each layer's whitened SVD."""
    model, ids = _model(), _ids()
    plan, spectra, _ = analyze(model, config, calib_ids=ids, batch_size=4, work_dir=tmp_path / "work", progress=False)
    grams = calibrate(model, ids, target_linears(model), batch_size=4, progress=False)
    for layer in (layer for layer in plan.layers if layer.rank is not None):
        weight = target_linears(model)[layer.name].weight
        U, V = spectra[layer.name].factors(layer.rank)
        U_ref, V_ref = whitened_svd(weight, grams[layer.name], max_rank=layer.rank).factors(layer.rank)
        assert torch.equal(U, U_ref) and torch.equal(V, V_ref), layer.name
    in_memory = _model()
    compress(in_memory, config, calib_ids=ids, batch_size=4, progress=False)
    streamed = _model()
    compress(streamed, config, calib_ids=ids, batch_size=4, work_dir=tmp_path / "work2", progress=False)
    _assert_identical(_weights(in_memory, tmp_path / "a"), _weights(streamed, tmp_path / "b"))


@pytest.mark.parametrize("where", ["factorizing", "recording"])
@pytest.mark.parametrize("after", range(BLOCKS - 1))
def test_run_interrupted_after_a_block_resumes_identically(after, where, tmp_path, monkeypatch):
    """Crash while factorizing the next block, or between writing its inputs and recording it."""
    config, ids = DRankConfig(keep=0.6, beta=0.2), _ids()
    whole = _model()
    compress(whole, config, calib_ids=ids, batch_size=4, progress=False)

    target, original = (spectra_module, "_block_spectra") if where == "factorizing" else (WorkDir, "finish_block")
    real = getattr(target, original)
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == after + 2:
            raise _Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(target, original, crashing)
    with pytest.raises(_Crash):
        compress(_model(), config, calib_ids=ids, batch_size=4, work_dir=tmp_path / "work", progress=False)
    monkeypatch.setattr(target, original, real)
    assert json.loads((tmp_path / "work" / "manifest.json").read_text())["blocks_done"] == after + 1

    resumed = _model()
    compress(resumed, config, calib_ids=ids, batch_size=4, work_dir=tmp_path / "work", resume=True, progress=False)
    _assert_identical(_weights(whole, tmp_path / "a"), _weights(resumed, tmp_path / "b"))


KILLED_RUN = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_work_dir import DRankConfig, _ids, _model
from lowrank_infer.workdir import WorkDir
from lowrank_infer.compress import compress

real = WorkDir.save_hidden
def save_then_die(self, block, hidden):
    real(self, block, hidden)
    if block == {block}:
        os.kill(os.getpid(), signal.SIGKILL)
WorkDir.save_hidden = save_then_die
compress(_model(), DRankConfig(keep=0.6, beta=0.2), calib_ids=_ids(), batch_size=4, work_dir={work!r}, progress=False)
"""


def test_run_killed_by_a_signal_resumes_identically(tmp_path):
    """SIGKILL (no clean-up of any kind) right after block 2's inputs are written."""
    tests = os.path.dirname(os.path.dirname(__file__))
    script = textwrap.dedent(KILLED_RUN).format(tests=os.path.join(tests, "runtime"), block=2, work=str(tmp_path / "w"))
    env = {**os.environ, "PYTHONPATH": tests}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr
    config, ids = DRankConfig(keep=0.6, beta=0.2), _ids()
    resumed = _model()
    compress(resumed, config, calib_ids=ids, batch_size=4, work_dir=tmp_path / "w", resume=True, progress=False)
    whole = _model()
    compress(whole, config, calib_ids=ids, batch_size=4, progress=False)
    _assert_identical(_weights(whole, tmp_path / "a"), _weights(resumed, tmp_path / "b"))


def test_resume_with_other_settings_is_refused(tmp_path):
    work = tmp_path / "work"
    compress(_model(), UniformConfig(keep=0.6), calib_ids=_ids(), work_dir=work, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(keep: 0.6 then, 0.5 now"):
        compress(_model(), UniformConfig(keep=0.5), calib_ids=_ids(), work_dir=work, resume=True, progress=False)
    with pytest.raises(ValueError, match="calibration"):
        compress(_model(), UniformConfig(keep=0.6), calib_ids=_ids(seq_len=20), work_dir=work, resume=True,
                 progress=False)
    other = _model()
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(2)
    with pytest.raises(ValueError, match="weights"):
        compress(other, UniformConfig(keep=0.6), calib_ids=_ids(), work_dir=work, resume=True, progress=False)


def test_work_dir_misuse_is_refused(tmp_path):
    work = tmp_path / "work"
    compress(_model(), UniformConfig(keep=0.6), calib_ids=_ids(), work_dir=work, progress=False)
    with pytest.raises(ValueError, match="pass --resume"):
        compress(_model(), UniformConfig(keep=0.6), calib_ids=_ids(), work_dir=work, progress=False)
    with pytest.raises(ValueError, match="resume needs the work directory"):
        compress(_model(), UniformConfig(keep=0.6), calib_ids=_ids(), resume=True, progress=False)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no manifest.json"):
        compress(_model(), UniformConfig(keep=0.6), calib_ids=_ids(), work_dir=stranger, progress=False)


def test_finished_run_resumes_without_recomputing(tmp_path, monkeypatch):
    config, ids = UniformConfig(keep=0.6), _ids()
    first = _model()
    compress(first, config, calib_ids=ids, work_dir=tmp_path / "w", progress=False)
    monkeypatch.setattr(spectra_module, "_block_spectra", lambda *a, **k: pytest.fail("recomputed a block"))
    again = _model()
    compress(again, config, calib_ids=ids, work_dir=tmp_path / "w", resume=True, progress=False)
    _assert_identical(_weights(first, tmp_path / "a"), _weights(again, tmp_path / "b"))


def test_stored_spectrum_reads_what_was_computed(tmp_path):
    model, ids = _model(), _ids()
    _, stored, _ = analyze(model, UniformConfig(keep=0.6), calib_ids=ids, work_dir=tmp_path / "w", progress=False)
    _, memory, _ = analyze(model, UniformConfig(keep=0.6), calib_ids=ids, progress=False)
    for name, spectrum in memory.items():
        s = stored[name]
        assert (s.out_features, s.in_features, s.max_rank) == (spectrum.out_features, spectrum.in_features,
                                                              spectrum.max_rank)
        assert torch.equal(s.sigma, spectrum.sigma) and torch.equal(s.left, spectrum.left)
        assert all(torch.equal(a, b) for a, b in zip(s.factors(3), spectrum.factors(3)))
        with pytest.raises(ValueError, match="outside the stored factors"):
            s.factors(s.max_rank + 1)


def test_cli_resume_needs_a_work_dir(capsys, tmp_path):
    from lowrank_infer.cli import main

    code = main(["compress", "--model", "no-such-model", "--resume", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err == "lowrank-infer compress: error: --resume needs --work-dir (the directory of the run to continue)"
