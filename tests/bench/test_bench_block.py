"""``bench block``: the units of a decoder block, the (backend, PDL) pairs, and the ratios of its rows."""

import dataclasses

import pytest
import torch

from lowrank_infer.bench import block
from lowrank_infer.bench.roofline import Peaks
from lowrank_infer.kernels import get_backend, get_pdl

CPU = torch.device("cpu")
PEAKS = Peaks(bandwidth_gbs=100.0, matmul_tflops=1.0, copy_bytes=0, matmul_size=0, dtype="float32")


def test_llama2_7b_units_at_keep_0_6_with_16_aligned_ranks():
    units = block.block_units("llama2-7b", 0.6, 16)
    assert [(u.name, u.form) for u in units] == [
        ("q/k/v/o", "single"), ("gate/up", "single"), ("down", "single"),
        ("qkv", "separate"), ("qkv", "grouped"), ("gate_up", "separate"), ("gate_up", "gated")]
    by_name = {(u.name, u.form): u for u in units}
    # floor(0.6 * 4096² / 8192) = 1228 -> 1216; floor(0.6 * 11008 * 4096 / 15104) = 1791 -> 1776.
    assert by_name[("q/k/v/o", "single")].ranks == (1216,)
    assert by_name[("down", "single")].shapes == ((4096, 11008),) and by_name[("down", "single")].ranks == (1776,)
    qkv = by_name[("qkv", "grouped")]
    assert qkv.shapes == ((4096, 4096),) * 3 and qkv.ranks == (1216,) * 3
    gated = by_name[("gate_up", "gated")]
    assert gated.gated and gated.shapes == ((11008, 4096),) * 2 and gated.ranks == (1776, 1776)


def test_gqa_groups_keep_each_projection_s_shape():
    qkv = next(u for u in block.block_units("llama3-8b", 0.6, 16) if u.name == "qkv")
    assert qkv.shapes == ((4096, 4096), (1024, 4096), (1024, 4096))


def test_pdl_doubles_only_the_triton_backends():
    assert block.impls(["dense", "cublas", "triton", "triton_fp32"], [False, True]) == [
        ("dense", None), ("cublas", None), ("triton", False), ("triton", True),
        ("triton_fp32", False), ("triton_fp32", True)]
    assert block.impls(["dense", "torch"], [False]) == [("dense", None), ("torch", None)]


def _settings(impls, tokens=(1, 4)):
    units = [u for u in block.block_units("smollm2-135m", 0.6, 16) if u.name in ("k/v", "qkv", "gate_up")]
    return block.BlockSettings("smollm2-135m", 0.6, units, list(tokens), impls, CPU, torch.float32, rep_ms=1)


# Fake times in ms: dense 4, cuBLAS 2, Triton 2.5, Triton with PDL 2; a group's one op takes 80 %
# of its separate calls.
_FAKE_MS = {("dense", None): 4.0, ("cublas", None): 2.0, ("triton", False): 2.5, ("triton", True): 2.0}


def test_rows_check_then_time_each_pair_under_its_backend_and_pdl(monkeypatch):
    timed = []

    def fake_time(calls, row, settings):
        timed.append((get_backend(), get_pdl()))
        return 1.0, "fake"

    monkeypatch.setattr(block, "_time", fake_time)
    before = (get_backend(), get_pdl())
    rows = block.run_block_bench(_settings(list(_FAKE_MS), tokens=[2]), PEAKS)
    assert len(rows) == 5 * 4 and all(r["status"] == "ok" for r in rows)  # the float64 check passed
    assert [(r["backend"], r["pdl"]) for r in rows[:4]] == list(_FAKE_MS)
    assert timed[:4] == [(before[0], before[1]), ("cublas", before[1]), ("triton", False), ("triton", True)]
    assert (get_backend(), get_pdl()) == before


def test_ratios_and_bandwidth_of_the_rows(monkeypatch):
    def fake_time(calls, row, settings):
        ms = _FAKE_MS[(row["backend"], row["pdl"])] * (0.8 if row["form"] in ("grouped", "gated") else 1.0)
        return ms, "fake"

    monkeypatch.setattr(block, "_time", fake_time)
    rows = block.run_block_bench(_settings(list(_FAKE_MS)), PEAKS)
    by_key = {(r["unit"], r["form"], r["tokens"], r["backend"], r["pdl"]): r for r in rows}
    cublas = by_key[("qkv", "grouped", 4, "cublas", None)]
    assert cublas["speedup_vs_dense"] == pytest.approx(4.0 / 2.0)  # dense grouped: 3.2 ms, cuBLAS 1.6
    assert cublas["speedup_vs_separate"] == pytest.approx(1 / 0.8) and cublas["pdl_gain"] is None
    pdl = by_key[("gate_up", "gated", 1, "triton", True)]
    assert pdl["pdl_gain"] == pytest.approx(2.5 / 2.0) and pdl["speedup_vs_separate"] == pytest.approx(1.25)
    assert by_key[("gate_up", "gated", 1, "triton", False)]["pdl_gain"] is None
    assert by_key[("k/v", "single", 1, "triton", True)]["speedup_vs_separate"] is None
    # GB/s on the weights alone: U and V of q, k and v at ranks 160, 80, 80 (float32).
    (m_q, n), (m_k, _), _ = cublas["shapes"]
    assert cublas["k"] == [160, 80, 80]
    assert cublas["weight_bytes"] == 4 * (160 * (m_q + n) + 2 * 80 * (m_k + n))
    assert cublas["gbs"] == pytest.approx(cublas["weight_bytes"] / 1.6 / 1e6)
    assert cublas["copy_frac"] == pytest.approx(cublas["gbs"] / PEAKS.bandwidth_gbs)
    assert by_key[("qkv", "grouped", 4, "dense", None)]["weight_bytes"] == 4 * n * (m_q + 2 * m_k)

    report = block.markdown_report({"environment": {"device_label": "CPU", "torch": "t", "triton": "t"},
                                    "peaks": PEAKS.to_dict(), "settings": {"model": "smollm2-135m", "keep": 0.6},
                                    "dtype": "float32", "command": "c", "rows": rows})
    side_by_side = report.split("### Every row")[0]
    assert "| triton+pdl x dense | " in side_by_side and "| triton+pdl PDL gain |" in side_by_side
    assert "| qkv | grouped | 4 | 160/80/80 | 3200.0 | 2.00 | 1.60 | 2.00 | 1.25 | 1.25 | 1.25 | 1.25 | 1.25 |" \
        in side_by_side


def test_a_wrong_grouped_op_fails_its_check_and_is_not_timed(monkeypatch):
    monkeypatch.setattr(block, "lowrank_grouped_linear", lambda x, V, Us: torch.zeros(x.shape[0], 576 + 2 * 192))
    monkeypatch.setattr(block, "_time", lambda *a: pytest.fail("timed a failed op"))
    settings = _settings([("torch", None)], tokens=[3])
    grouped = [u for u in settings.units if u.form == "grouped"]
    rows = block.run_block_bench(dataclasses.replace(settings, units=grouped), PEAKS)
    assert [r["status"] for r in rows] == ["failed: relative error 1 > 0.0001"]
    assert rows[0]["median_ms"] is None and rows[0]["speedup_vs_separate"] is None


def test_reference_is_the_projections_own_math():
    unit = next(u for u in block.block_units("smollm2-135m", 0.6, 16) if u.form == "gated")
    x, members = block._members(unit, 3, True, torch.float32, CPU)
    (U_g, Vt_g), (U_u, Vt_u) = ([t.double() for t in pair] for pair in members)
    expected = torch.nn.functional.silu(x.double() @ (U_g @ Vt_g).T) * (x.double() @ (U_u @ Vt_u).T)
    torch.testing.assert_close(block._reference(unit, x, members), expected)
    torch.testing.assert_close(block._call(unit, x, members)().double(), expected, rtol=1e-4, atol=1e-5)
