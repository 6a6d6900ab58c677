"""The CUDA paths of ``bench``: do_bench, CUDA-graph timing with rotating weights, graph-captured decode."""

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_kernels_on_cuda_time_decode_shapes_as_graphs(bench, tmp_path):
    out = tmp_path / "kernels.json"
    code, err = bench("kernels", "--device", "cuda", "--models", "smollm2-135m", "--layers", "q", "down",
                      "--keep", 0.6, "--tokens", 1, 16, 64, "--rep-ms", 5, "--json", out)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["dtype"] == "bfloat16" and doc["environment"]["gpu"] == torch.cuda.get_device_name()
    assert doc["peaks"]["bandwidth_gbs"] > 100 and doc["peaks"]["matmul_tflops"] > 10
    for row in doc["rows"]:
        assert row["status"] == "ok", row
        assert row["timer"] == ("cuda_graph" if row["tokens"] <= 16 else "do_bench")
    assert {r["backend"] for r in doc["rows"]} == {"dense", "cublas", "triton", "torch"}


def test_e2e_on_cuda_captures_the_decode_step(bench, tmp_path):
    out = tmp_path / "e2e.json"
    code, err = bench("e2e", "--device", "cuda", "--shape-only", "--config", "smollm2-135m", "--quick",
                      "--rep-ms", 20, "--json", out)
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert {r["backend"] for r in rows} == {"dense", "cublas", "triton"}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["peak_memory_bytes"] > row["model_bytes"]
        assert row["timer"] == ("cuda_graph" if row["phase"] == "decode" else "do_bench")
