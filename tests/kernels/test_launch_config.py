"""Path thresholds, heuristic configs and the tuned-table lookup (pure Python)."""

import json

import pytest

from lowrank_infer.kernels import launch_config
from lowrank_infer.kernels.launch_config import (
    DECODE_MAX_TOKENS, FUSED_MAX_RANK, KERNELS, bucket_key, get_config, select_path,
)


def test_path_thresholds():
    assert select_path(1, 100_000) == "decode"
    assert select_path(DECODE_MAX_TOKENS, 1) == "decode"
    assert select_path(DECODE_MAX_TOKENS + 1, 1) == "prefill"
    assert select_path(8192, FUSED_MAX_RANK) == "prefill"
    assert select_path(DECODE_MAX_TOKENS + 1, FUSED_MAX_RANK + 1) == "shrink_expand"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1), (3, 37, 24, 7), (16, 4096, 4096, 1024), (130, 576, 1536, 256),
              (8192, 11008, 4096, 2048)])
def test_heuristics_give_compilable_blocks(kernel, shape):
    cfg = get_config(kernel, *shape, device_name="no-such-gpu", num_sms=132, elem_bytes=2)
    blocks = {key: value for key, value in cfg.items() if key.startswith("BLOCK_")}
    assert blocks and all(v >= 16 and v & (v - 1) == 0 for v in blocks.values()), cfg
    assert cfg["num_warps"] in (1, 2, 4, 8, 16) and cfg["num_stages"] >= 1


def test_decode_heuristic_bounds_partials():
    """The fp32 partials [k/BLOCK_K, T, m] stay at most a quarter of the weight bytes."""
    m = n = 4096
    k = 1024
    for T in range(1, DECODE_MAX_TOKENS + 1):
        cfg = get_config("decode", T, m, n, k, device_name="x", num_sms=132, elem_bytes=2)
        assert (k // cfg["BLOCK_K"]) * T * m * 4 <= k * (m + n) * 2 / 4
        assert cfg["BLOCK_K"] == 16 or T > 4  # single tokens get the most slices


def test_decode_heuristic_splits_m_when_slices_leave_sms_idle():
    def groups(k):
        return get_config("decode", 1, 4096, 4096, k, device_name="x", num_sms=132,
                          elem_bytes=2)["M_GROUPS"]

    assert groups(1024) == 2  # 64 slices of 16: two m-groups fill one wave of 132 SMs
    assert groups(64) == 4  # few slices: capped at 4 groups (each re-reads its V slice)
    assert groups(4096) == 1  # 256 slices already cover the SMs


def test_prefill_heuristic_fills_sms_when_tokens_are_few():
    few = get_config("prefill", 32, 4096, 4096, 128, device_name="x", num_sms=132, elem_bytes=2)
    many = get_config("prefill", 8192, 4096, 4096, 128, device_name="x", num_sms=132, elem_bytes=2)
    assert few["M_GROUPS"] == 4096 // few["BLOCK_M"]  # one token tile: spread m over the SMs
    assert many["M_GROUPS"] == 1  # enough token tiles: each program covers all of m


def _write_table(monkeypatch, tmp_path, table):
    monkeypatch.setattr(launch_config, "CONFIG_DIR", tmp_path)
    launch_config.config_file("Fake GPU 80GB").write_text(json.dumps(table))
    assert (tmp_path / "Fake_GPU_80GB.json").exists()


def test_nearest_bucket_wins(monkeypatch, tmp_path):
    small = {"BLOCK_T": 16, "BLOCK_N": 64, "BLOCK_K": 16, "BLOCK_M": 64, "M_GROUPS": 1,
             "num_warps": 4, "num_stages": 2}
    large = dict(small, BLOCK_K=64)
    _write_table(monkeypatch, tmp_path, {"device": "Fake GPU 80GB", "decode": {
        bucket_key(1, 4096, 4096, 1024): small, bucket_key(16, 4096, 4096, 1024): large}})

    def lookup(T, k=1024):
        return get_config("decode", T, 4096, 4096, k, device_name="Fake GPU 80GB", num_sms=132,
                          elem_bytes=2)

    assert lookup(1) == small and lookup(2) == small
    assert lookup(12) == large and lookup(16, 900) == large
    # A kernel without entries falls back to the heuristics.
    assert "BLOCK_R" in get_config("shrink", 64, 4096, 4096, 1024, device_name="Fake GPU 80GB",
                                   num_sms=132, elem_bytes=2)


@pytest.mark.parametrize(
    "entry, message",
    [({"BLOCK_T": 16, "num_warps": 4, "num_stages": 2}, "lacks"),
     ({"BLOCK_T": 16, "BLOCK_N": 48, "BLOCK_K": 16, "BLOCK_M": 64, "M_GROUPS": 1, "num_warps": 4,
       "num_stages": 2}, "powers of two")],
)
def test_malformed_table_is_rejected(monkeypatch, tmp_path, entry, message):
    _write_table(monkeypatch, tmp_path, {"decode": {bucket_key(1, 64, 64, 16): entry}})
    with pytest.raises(ValueError, match=message):
        get_config("decode", 1, 64, 64, 16, device_name="Fake GPU 80GB", num_sms=1, elem_bytes=2)
