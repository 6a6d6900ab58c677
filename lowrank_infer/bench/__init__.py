"""Speed benchmarks: ``lowrank-infer bench kernels`` (one layer) and ``bench e2e`` (a whole model).

Library entry points for scripts; the CLI lives in :mod:`lowrank_infer.bench.cli`.
"""

from lowrank_infer.bench.cli import add_bench_parser
from lowrank_infer.bench.e2e import E2ESettings, lowrank_path, run_e2e_bench
from lowrank_infer.bench.kernels import KernelSettings, run_kernel_bench
from lowrank_infer.bench.providers import PROVIDERS, Provider
from lowrank_infer.bench.roofline import Peaks, measure_peaks
from lowrank_infer.bench.shapes import MODELS, layer_shapes

__all__ = [
    "E2ESettings",
    "KernelSettings",
    "MODELS",
    "PROVIDERS",
    "Peaks",
    "Provider",
    "add_bench_parser",
    "layer_shapes",
    "lowrank_path",
    "measure_peaks",
    "run_e2e_bench",
    "run_kernel_bench",
]
