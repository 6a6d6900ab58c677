"""Bytes, flops and roofline fractions."""

from lowrank_infer.bench.roofline import Peaks, layer_cost, throughput


def test_layer_cost_counts_x_weights_and_y():
    assert layer_cost(8, 4, None, 2, 2) == ((2 * 4 + 8 * 4 + 2 * 8) * 2, 2 * 2 * 8 * 4)
    assert layer_cost(8, 4, 3, 2, 4) == ((2 * 4 + 3 * 12 + 2 * 8) * 4, 2 * 2 * 3 * 12)


def test_throughput_fractions():
    peaks = Peaks(bandwidth_gbs=1000.0, matmul_tflops=100.0, copy_bytes=0, matmul_size=0, dtype="bfloat16")
    memory_bound = throughput(ms=1.0, nbytes=10**9, flops=10**9, peaks=peaks)
    assert memory_bound["gbs"] == 1000.0 and memory_bound["mem_frac"] == 1.0
    assert memory_bound["roofline_frac"] == 1.0 and memory_bound["compute_frac"] == 0.01
    compute_bound = throughput(ms=2.0, nbytes=10**6, flops=10**11, peaks=peaks)
    assert compute_bound["tflops"] == 50.0 and compute_bound["roofline_frac"] == 0.5
