"""Speed benchmarks: ``lowrank-infer bench kernels`` (one layer), ``bench block`` (one decoder
block's projections, alone and grouped) and ``bench e2e`` (a whole model).

All time the library as users run it: ``lowrank_linear`` and the grouped ops under each backend
of :data:`BACKENDS` (``dense`` = the dense baseline), models compressed by ``apply_plan``.
"""

from lowrank_infer.bench.backends import BACKENDS, backend_of
from lowrank_infer.bench.block import BlockSettings, run_block_bench
from lowrank_infer.bench.cli import add_bench_parser
from lowrank_infer.bench.e2e import E2ESettings, run_e2e_bench
from lowrank_infer.bench.kernels import KernelSettings, run_kernel_bench
from lowrank_infer.bench.roofline import Peaks, measure_peaks
from lowrank_infer.bench.shapes import MODELS, layer_shapes

__all__ = [
    "BACKENDS",
    "BlockSettings",
    "E2ESettings",
    "KernelSettings",
    "MODELS",
    "Peaks",
    "add_bench_parser",
    "backend_of",
    "layer_shapes",
    "measure_peaks",
    "run_block_bench",
    "run_e2e_bench",
    "run_kernel_bench",
]
