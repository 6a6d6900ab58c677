"""pytest-benchmark cases of the layer providers, each checked against float64 before it is timed.

``pytest benchmarks/test_kernel_bench.py --benchmark-only`` times them; a normal test run
(best with ``--benchmark-disable``) runs each once, as a correctness test. The README's kernel
numbers come from ``benchmarks/run_kernels.py``, whose timers handle L2 and launch overhead.
"""

import pytest
import torch

from lowrank_infer.bench.providers import PROVIDERS, check_provider, make_operands, reference
from lowrank_infer.bench.shapes import MODELS, rank_for_keep

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
KEEP = 0.6
# (model, projection, tokens): decode- and prefill-sized calls of an attention and an MLP weight.
CASES = [("smollm2-135m", "q", 1), ("smollm2-135m", "down", 64)]
if DEVICE.type == "cuda":
    CASES += [("llama2-7b", "q", 1), ("llama2-7b", "down", 512)]
# Triton on CPU runs in its interpreter: far too slow to benchmark, and tested in tests/kernels.
NAMES = [name for name in PROVIDERS if DEVICE.type == "cuda" or not name.startswith("triton")]


@pytest.mark.benchmark(max_time=0.2, min_rounds=3)
@pytest.mark.parametrize("provider", NAMES)
@pytest.mark.parametrize(("model", "layer", "tokens"), CASES)
def test_provider(benchmark, provider, model, layer, tokens):
    m, n = MODELS[model].layer_shapes()[layer]
    impl = PROVIDERS[provider]
    operands = make_operands(m, n, None if impl.dense else rank_for_keep(m, n, KEEP), tokens, DTYPE, DEVICE)
    ref = reference(operands)
    if impl.prepare is not None:
        operands = impl.prepare(operands)
    assert check_provider(impl, operands, ref) is None

    def call():
        impl.fn(*operands)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # wall-clock timer: wait for the kernel itself

    benchmark(call)
