"""What a result file records about the machine: the CPU's model, read from Linux's cpuinfo."""

import platform

from lowrank_infer.bench.output import cpu_model

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu vme

processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
"""


def test_cpu_model_reads_the_model_name(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert cpu_model(str(path)) == "AMD EPYC 9654 96-Core Processor"


def test_cpu_model_falls_back_without_cpuinfo(tmp_path):
    fallback = platform.processor() or platform.machine()
    assert cpu_model(str(tmp_path / "missing")) == fallback
    # A cpuinfo without a model name (some ARM kernels) also falls back.
    (tmp_path / "arm").write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert cpu_model(str(tmp_path / "arm")) == fallback
