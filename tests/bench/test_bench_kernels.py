"""The ranks ``bench kernels`` times a layer at."""

import pytest

from lowrank_infer.bench.kernels import layer_rank


def test_layer_rank_is_the_uniform_formula():
    assert layer_rank(4096, 4096, 0.6) == 1228  # floor(0.6 * 4096^2 / 8192)
    assert layer_rank(11008, 4096, 0.4) == int(0.4 * 11008 * 4096 // (11008 + 4096))
    # floor(0.2 * 192 * 576 / 768) = 28: one layer timed alone needs no budget repair.
    assert layer_rank(192, 576, 0.2) == 28


def test_layer_rank_rounds_down_to_a_multiple():
    assert layer_rank(576, 576, 0.6, multiple_of=16) == 160  # floor(172.8) = 172 -> 160
    assert layer_rank(576, 576, 0.01, multiple_of=16) == 16  # at least one multiple


def test_layer_rank_refuses_dense_layers_and_bad_keeps():
    with pytest.raises(ValueError, match="keep 1.0 with multiple_of 1 leaves a 64x64 layer dense"):
        layer_rank(64, 64, 1.0)
    with pytest.raises(ValueError, match="multiple_of 1024 leaves a 576x576 layer dense"):
        layer_rank(576, 576, 0.6, multiple_of=1024)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        layer_rank(64, 64, 1.5)
