"""Compression with the decoder blocks kept on disk gives the in-memory checkpoint, bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lowrank_infer.allocation import ARAConfig, DRankConfig, UniformConfig
from lowrank_infer.compress import compress
from lowrank_infer.io import save_compressed
from lowrank_infer.offload import DiskWeights, holds, load_offloaded

CONFIGS = {
    "uniform": UniformConfig(keep=0.6),
    "drank": DRankConfig(keep=0.6, beta=0.2),
    "uniform-plain": UniformConfig(keep=0.6, whiten=False),
    "drank-sequential": DRankConfig(keep=0.6, beta=0.2, sequential=True),
}


def _ids():
    return torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(1))


def _compressed_weights(model, config, path, **kw):
    compress(model, config, calib_ids=_ids(), batch_size=4, progress=False, **kw)
    save_compressed(model, path)
    return load_file(path / "model.safetensors")


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("name", CONFIGS)
def test_blocks_on_disk_give_the_in_memory_checkpoint(name, tiny_model_dir, tmp_path):
    config = CONFIGS[name]
    in_memory = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    on_disk = load_offloaded(tiny_model_dir)
    assert holds(on_disk) and all(p.is_meta for p in on_disk.model.layers.parameters())
    assert not any(p.is_meta for n, p in on_disk.named_parameters() if ".layers." not in n)
    want = _compressed_weights(in_memory, config, tmp_path / "a")
    got = _compressed_weights(on_disk, config, tmp_path / "b")
    _assert_identical(want, got)
    assert not any(p.is_meta for p in on_disk.parameters())  # whole once compressed


def test_blocks_are_dropped_after_use(tiny_model_dir):
    from lowrank_infer.compress import analyze

    model = load_offloaded(tiny_model_dir)
    analyze(model, UniformConfig(keep=0.6), calib_ids=_ids(), progress=False)
    assert all(p.is_meta for p in model.model.layers.parameters())


def test_resume_with_blocks_on_disk(tiny_model_dir, tmp_path, monkeypatch):
    import importlib

    spectra = importlib.import_module("lowrank_infer.spectra")
    config = DRankConfig(keep=0.6, beta=0.2)
    want = _compressed_weights(load_offloaded(tiny_model_dir), config, tmp_path / "a")
    real, calls = spectra._block_spectra, []

    def crash_on_second_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(spectra, "_block_spectra", crash_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        compress(load_offloaded(tiny_model_dir), config, calib_ids=_ids(), batch_size=4, work_dir=tmp_path / "w",
                 progress=False)
    monkeypatch.setattr(spectra, "_block_spectra", real)
    got = _compressed_weights(load_offloaded(tiny_model_dir), config, tmp_path / "b", work_dir=tmp_path / "w",
                              resume=True)
    _assert_identical(want, got)


@pytest.mark.parametrize("config", [ARAConfig(keep=0.6), DRankConfig(keep=0.6)], ids=["ara", "drank-auto"])
def test_methods_that_run_the_whole_model_are_refused(config, tiny_model_dir):
    with pytest.raises(ValueError, match="runs the whole model, which weights kept on disk never are"):
        compress(load_offloaded(tiny_model_dir), config, calib_ids=_ids(), progress=False)


def test_bad_sources_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="not one"):
        load_offloaded(tmp_path)
    with pytest.raises(ValueError, match="holds no .safetensors files"):
        DiskWeights(tmp_path)
    with pytest.raises(ValueError, match="not in the safetensors files"):
        DiskWeights(tiny_model_dir).tensor("model.layers.9.mlp.up_proj.weight")


def test_cli_refuses_eval_with_weights_on_disk(capsys, tmp_path):
    from lowrank_infer.cli import main

    code = main(["compress", "--model", "x", "--weights-on-disk", "--eval-file", "t.txt", "--out", str(tmp_path / "o")])
    assert code == 1 and "--eval-file measures the dense model" in capsys.readouterr().err
