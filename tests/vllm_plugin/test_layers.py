"""Layer level: merged, mixed dense/low-rank and fused layers at tensor-parallel sizes 1 and 2,
half and fully sharded.

Each size runs in freshly spawned processes over gloo, so vLLM's distributed state never leaks
into this process (where ``LLM`` starts engines of its own).
"""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("vllm", reason="needs vLLM, installed in a venv of its own: see tests/vllm_plugin/README.md")

import torch.multiprocessing as mp  # noqa: E402

import vllm_layers  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_layers_match_vllm_dense_layers(world_size, dtype):
    """Both tensor-parallel layouts (half and fully sharded) in the same processes."""
    # spawn re-raises a rank's exception (with its traceback) here.
    mp.spawn(vllm_layers.run_rank, args=(world_size, _free_port(), dtype), nprocs=world_size, join=True)
