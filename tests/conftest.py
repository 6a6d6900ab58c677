"""Shared fixtures: a tiny model checkpoint, some text, and the real-data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from tiny_models import tiny_model, tiny_tokenizer

# The same Hypothesis examples on every run, so that a test run's verdict does not depend on
# chance; HYPOTHESIS_PROFILE=explore draws new examples each run, to look for failures.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LOWRANK_INFER_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _auto_compute_dtype_is_float32(monkeypatch):
    """``--compute-dtype auto`` resolves to float32 whatever the CPU, so that no result depends on
    the machine the tests run on; tests of bfloat16 ask for it."""
    monkeypatch.setattr("lowrank_infer.precision._cpu_flags", lambda: frozenset())


@pytest.fixture
def data_dir() -> Path:
    if not (DATA / "wikitext2" / "test.raw.txt").is_file():
        pytest.skip(f"WikiText-2 files not found under {DATA} (set LOWRANK_INFER_DATA)")
    return DATA


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A dense tiny Llama (GQA) checkpoint with a tokenizer, as a local HF directory."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_text(tmp_path) -> Path:
    """A few kilobytes of English-like text for calibration and evaluation."""
    words = "the of and to in is was for on as with by at from his her an which it were are".split()
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (1500,), generator=gen).tolist()
    path = tmp_path / "text.txt"
    path.write_text(" ".join(words[i] for i in picks) + "\n", encoding="utf-8")
    return path
