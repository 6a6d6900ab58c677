"""Bench-test setup: one CPU thread, a tiny model config, and the in-process ``lowrank-infer bench``."""

import json

import pytest
import torch

TINY_CONFIG = {
    "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Multi-threaded GEMMs stall for milliseconds on a loaded machine; one thread keeps tests fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config_file(tmp_path):
    path = tmp_path / "tiny-config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture
def bench(capsys):
    """``bench(*argv) -> (exit code, stderr)``: ``lowrank-infer bench *argv``, in process."""
    from lowrank_infer.cli import main

    def run(*argv):
        code = main(["bench", *map(str, argv)])
        return code, capsys.readouterr().err

    return run
