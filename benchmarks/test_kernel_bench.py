"""pytest-benchmark cases of the layer backends, each checked against float64 before it is timed.

``pytest benchmarks/test_kernel_bench.py -o addopts= --benchmark-only`` times them; a normal
test run (benchmarks disabled) runs each once, as a correctness test. The README's kernel
numbers come from ``lowrank-infer bench kernels``, whose timers handle L2 and launch overhead.
"""

import pytest
import torch
import torch.nn.functional as F

from lowrank_infer.bench.backends import BACKENDS, CPU_BACKENDS, running
from lowrank_infer.bench.kernels import layer_rank
from lowrank_infer.bench.operands import check_call, make_operands, reference
from lowrank_infer.bench.shapes import MODELS
from lowrank_infer.kernels import lowrank_linear

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
KEEP = 0.6
# (model, projection, tokens): decode- and prefill-sized calls of an attention and an MLP weight.
CASES = [("smollm2-135m", "q", 1), ("smollm2-135m", "down", 64)]
if DEVICE.type == "cuda":
    CASES += [("llama2-7b", "q", 1), ("llama2-7b", "down", 512)]


@pytest.mark.benchmark(max_time=0.2, min_rounds=3)
@pytest.mark.parametrize("backend", BACKENDS if DEVICE.type == "cuda" else CPU_BACKENDS)
@pytest.mark.parametrize(("model", "layer", "tokens"), CASES)
def test_backend(benchmark, backend, model, layer, tokens):
    m, n = MODELS[model].layer_shapes()[layer]
    dense = backend == "dense"
    operands = make_operands(m, n, None if dense else layer_rank(m, n, KEEP), tokens, DTYPE, DEVICE)
    fn = F.linear if dense else lowrank_linear

    def call():
        fn(*operands)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # wall-clock timer: wait for the kernel itself

    with running(backend):
        assert check_call(fn, operands, reference(operands)) is None
        benchmark(call)
