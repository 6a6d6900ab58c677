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


def test_decode_shrink_spreads_vt_evenly_over_the_sms():
    """64-row tiles of Vᵀ (the smallest wgmma M), n split so that about one program per SM
    streams an equal share, no more than fits two BLOCK_N steps each; 512-byte runs up to 16
    tokens, 256-byte runs above."""
    for T, run_bytes in ((1, 512), (16, 512), (32, 256)):
        for k, n in ((1216, 4096), (1776, 11008), (491, 4096)):
            cfg = get_config("decode_shrink", T, 4096, n, k, device_name="x", num_sms=132, elem_bytes=2)
            assert cfg["BLOCK_K"] == 64 and cfg["BLOCK_N"] * 2 == run_bytes
            per_split = -(-(-(-n // cfg["SPLIT_N"])) // cfg["BLOCK_N"]) * cfg["BLOCK_N"]
            programs = -(-k // 64) * -(-n // per_split)
            capped = cfg["SPLIT_N"] == n // (2 * cfg["BLOCK_N"])  # each split streams two runs
            assert programs <= 132 and (programs >= 100 or capped), (T, k, n, cfg, programs)
    few = get_config("decode_shrink", 1, 64, 100, 16, device_name="x", num_sms=132, elem_bytes=4)
    assert few["SPLIT_N"] == 1 and few["BLOCK_K"] == 16 and few["BLOCK_N"] * 4 == 512


def test_decode_expand_gives_every_other_sm_whole_rows_of_u():
    for m, rows in ((4096, 32), (11008, 32), (2048, 16), (576, 16)):
        for T, run_bytes in ((1, 256), (32, 128)):
            cfg = get_config("decode_expand", T, m, 4096, 1228, device_name="x", num_sms=132, elem_bytes=2)
            assert cfg["BLOCK_M"] == rows and cfg["BLOCK_K"] * 2 == run_bytes and cfg["num_warps"] == 4
            assert -(-m // rows) >= 132 // 2 or rows == 16


def test_h200_tuned_decode_entries_agree_with_the_heuristics():
    """The heuristics restate the H200 tuning: the shrink's split exactly, and every tuned block
    size at all but two of each kernel's nine tuned shapes (the tuner preferred other run lengths
    for two of them)."""
    from lowrank_infer.kernels.launch_config import config_file

    table = json.loads(config_file("NVIDIA H200").read_text())
    for kernel in ("decode_shrink", "decode_expand"):
        differ = []
        for key, tuned in table[kernel].items():
            T, m, n, k = (int(part.split("=")[1]) for part in key.split(","))
            cfg = get_config(kernel, T, m, n, k, device_name="no-such-gpu", num_sms=132, elem_bytes=2)
            if any(cfg[name] != value for name, value in tuned.items() if name.startswith("BLOCK_")):
                differ.append((key, cfg, tuned))
            assert cfg.get("SPLIT_N") == tuned.get("SPLIT_N"), (key, cfg, tuned)
        assert len(table[kernel]) == 9 and len(differ) <= 2, differ


def test_gemm_heuristic_does_not_split_large_outputs():
    cfg = get_config("shrink", 8192, 4096, 4096, 1024, device_name="x", num_sms=132, elem_bytes=2)
    assert cfg["SPLIT_D"] == 1


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
    small = {"BLOCK_R": 16, "BLOCK_C": 64, "BLOCK_D": 16, "GROUP_R": 1, "SPLIT_D": 8,
             "num_warps": 4, "num_stages": 2}
    large = dict(small, BLOCK_C=128)
    _write_table(monkeypatch, tmp_path, {"device": "Fake GPU 80GB", "shrink": {
        bucket_key(1, 4096, 4096, 1024): small, bucket_key(16, 4096, 4096, 1024): large}})

    def lookup(T, k=1024):
        return get_config("shrink", T, 4096, 4096, k, device_name="Fake GPU 80GB",
                          num_sms=132, elem_bytes=2)

    assert lookup(1) == small and lookup(2) == small
    assert lookup(12) == large and lookup(16, 900) == large
    # A kernel without entries falls back to the heuristics.
    assert "BLOCK_R" in get_config("shrink", 64, 4096, 4096, 1024, device_name="Fake GPU 80GB",
                                   num_sms=132, elem_bytes=2)


_GOOD = {"BLOCK_R": 16, "BLOCK_C": 64, "BLOCK_D": 16, "GROUP_R": 1, "SPLIT_D": 1, "num_warps": 4,
         "num_stages": 2}


@pytest.mark.parametrize(
    "entry, message",
    [({"BLOCK_R": 16, "num_warps": 4, "num_stages": 2}, "lacks"),
     (dict(_GOOD, BLOCK_C=48), r"\['BLOCK_C'\] must be powers of two"),
     (dict(_GOOD, num_warps=3), r"\['num_warps'\] must be powers of two"),
     (dict(_GOOD, SPLIT_D=0), r"\['SPLIT_D'\] must be positive integers"),
     (dict(_GOOD, SPLIT_D=1.5), r"\['SPLIT_D'\] must be positive integers"),
     (dict(_GOOD, GROUP_R=0), r"\['GROUP_R'\] must be positive integers"),
     (dict(_GOOD, num_stages=True), r"\['num_stages'\] must be positive integers")],
)
def test_malformed_table_is_rejected(monkeypatch, tmp_path, entry, message):
    _write_table(monkeypatch, tmp_path, {"shrink": {bucket_key(1, 64, 64, 16): entry}})
    with pytest.raises(ValueError, match=message):
        get_config("shrink", 1, 64, 64, 16, device_name="Fake GPU 80GB", num_sms=1,
                   elem_bytes=2)


def test_malformed_prefill_groups_are_rejected(monkeypatch, tmp_path):
    entry = {"BLOCK_T": 16, "BLOCK_N": 32, "BLOCK_M": 64, "M_GROUPS": 0, "num_warps": 4, "num_stages": 2}
    _write_table(monkeypatch, tmp_path, {"prefill": {bucket_key(64, 64, 64, 16): entry}})
    with pytest.raises(ValueError, match=r"\['M_GROUPS'\] must be positive integers"):
        get_config("prefill", 64, 64, 64, 16, device_name="Fake GPU 80GB", num_sms=1, elem_bytes=2)


@pytest.mark.parametrize("key", ["T=4,m=37,n=24", "T=0,m=37,n=24,k=7", "T=1,m=2,n=2,k=2,x=1", "T=a,m=1,n=1,k=1"])
def test_malformed_table_key_is_rejected(monkeypatch, tmp_path, key):
    _write_table(monkeypatch, tmp_path, {"shrink": {key: _GOOD}})
    with pytest.raises(ValueError, match=f"tuned config key '{key}' must be"):
        get_config("shrink", 1, 64, 64, 16, device_name="Fake GPU 80GB", num_sms=1, elem_bytes=2)


def test_fp32_ignores_the_16_bit_table(monkeypatch, tmp_path):
    """Tables are tuned on 16-bit inputs; fp32 tiles of the same sizes need twice the shared memory."""
    tuned = dict(_GOOD, BLOCK_C=256, BLOCK_D=128, num_stages=4)
    _write_table(monkeypatch, tmp_path, {"shrink": {bucket_key(2048, 4096, 4096, 1024): tuned}})

    def lookup(elem_bytes):
        return get_config("shrink", 2048, 4096, 4096, 1024, device_name="Fake GPU 80GB", num_sms=132,
                          elem_bytes=elem_bytes)

    assert lookup(2) == tuned
    assert lookup(4) != tuned and lookup(4) == launch_config._HEURISTICS["shrink"](
        2048, 4096, 4096, 1024, num_sms=132, elem_bytes=4)
