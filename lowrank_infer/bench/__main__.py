"""``python -m lowrank_infer.bench {kernels,e2e} …``: the benchmarks without the main CLI."""

import sys

from lowrank_infer.bench.cli import main

sys.exit(main())
