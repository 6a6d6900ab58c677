"""Ahead-of-time sm_90 compiles of every Triton kernel: no register spills, shared memory fits.

Triton compiles for an H100 on this CPU with the ptxas bundled in its wheel. Each case is a
layer shape and path as ``launch`` would run it on an H100, with the heuristic configs (for
LLaMA-2-7B shapes at decode and prefill token counts) or with tuned table entries. One
subprocess compiles them all (the kernels here are interpreted: TRITON_INTERPRET=1 is fixed when
``@triton.jit`` runs); V is rank-major, as ``LowRankLinear`` stores it. Every kernel's MMA
(Hopper's ``wgmma`` or Ampere-style ``mma.sync``) is printed (``pytest -rP``) and recorded as a
junit property; ``wgmma`` is asserted where the design needs it (the decode shrink), and so are
the PDL instructions of kernels built for programmatic dependent launch.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="needs Triton with its NVIDIA backend")

from lowrank_infer.kernels.aot import GATED_PATHS, H100, H200, SM90_MAX_SHARED_BYTES, tools_missing  # noqa: E402

# A name without a tuned table: the heuristics, with the H100's SM count.
HEURISTICS = {"device_name": "sm_90 heuristics", "num_sms": H100["num_sms"]}
# LLaMA-2-7B at keep 0.6 (q/k/v/o, gate/up, down; uniform ranks), and at low ranks, where
# prefills run the fused kernel (k <= 256), in each of its three block regimes.
KEEP_06 = [(4096, 4096, 1228), (11008, 4096, 1790), (4096, 11008, 1790)]
FUSED = [(4096, 4096, 256), (11008, 4096, 128), (4096, 11008, 48)]


def _heuristic_cases():
    cases = []
    for dtype in ("float16", "bfloat16"):
        for m, n, k in KEEP_06:
            cases += [dict(path="decode", T=T, m=m, n=n, k=k, dtype=dtype, **HEURISTICS) for T in (1, 16, 32)]
            cases.append(dict(path="shrink_expand", T=2048, m=m, n=n, k=k, dtype=dtype, bias=True, **HEURISTICS))
        for m, n, k in FUSED:
            cases += [dict(path="prefill", T=T, m=m, n=n, k=k, dtype=dtype, **HEURISTICS) for T in (512, 2048)]
    # The gated MLP's decode (gate and up of LLaMA-2-7B at keep 0.6, each of rank 1790), and
    # every decode kernel built for programmatic dependent launch.
    for path in GATED_PATHS:
        cases += [dict(path=path, T=T, m=11008, n=4096, k=1790, dtype="bfloat16", **HEURISTICS) for T in (1, 32)]
    cases += [dict(path="decode", T=16, m=m, n=n, k=k, dtype="bfloat16", pdl=True, **HEURISTICS) for m, n, k in KEEP_06]
    cases.append(dict(path="decode_gated_silu", T=16, m=11008, n=4096, k=1790, dtype="float16", pdl=True, **HEURISTICS))
    # fp32 tiles take twice the bytes; the heuristics size some of them by element size.
    cases += [dict(path="decode", T=16, m=m, n=n, k=k, dtype="float32", **HEURISTICS) for m, n, k in KEEP_06[:2]]
    cases.append(dict(path="shrink_expand", T=2048, m=4096, n=4096, k=1228, dtype="float32", **HEURISTICS))
    cases += [dict(path="prefill", T=512, m=m, n=n, k=k, dtype="float32", **HEURISTICS) for m, n, k in FUSED]
    return cases


# A handful of the H100 table's entries, each launched at its own shape.
TUNED = [dict(path=path, T=T, m=m, n=n, k=k, dtype=dtype, **H100) for path, T, m, n, k, dtype in [
    ("decode", 1, 4096, 4096, 1228, "float16"), ("decode", 16, 4096, 11008, 1790, "bfloat16"),
    ("decode", 16, 11008, 4096, 1790, "bfloat16"), ("decode", 1, 1024, 4096, 491, "float16"),
    ("shrink_expand", 2048, 4096, 4096, 1228, "float16"),
    ("shrink_expand", 2048, 4096, 11008, 1790, "bfloat16")]]
# The H200 table's decode entries (LLaMA-2-7B at keep 0.6, ranks multiples of 16), plain, grouped
# (q/k/v: one shrink over k = 3 x 1216, a shape the table lacks) and gated.
TUNED += [dict(path=path, T=T, m=m, n=n, k=k, dtype="bfloat16", **H200) for path, T, m, n, k in [
    ("decode", 1, 4096, 4096, 1216), ("decode", 32, 11008, 4096, 1776), ("decode", 16, 4096, 11008, 1776),
    ("decode", 1, 4096, 4096, 3648), ("decode_gated_silu", 1, 11008, 4096, 1776),
    ("decode_gated_silu", 32, 11008, 4096, 1776)]]
CASES = _heuristic_cases() + TUNED
_TABLES = {H100["device_name"]: "tuned", H200["device_name"]: "tuned-h200"}


def _case_id(case):
    table = _TABLES.get(case["device_name"], "heuristic")
    pdl = "-pdl" if case.get("pdl") else ""
    return f"{table}-{case['path']}-T{case['T']}-{case['m']}x{case['n']}-k{case['k']}-{case['dtype']}{pdl}"


@pytest.fixture(scope="module")
def compiled():
    """``{case id: [launch result, ...]}`` from one subprocess that compiles every case."""
    reason = tools_missing()
    if reason:
        pytest.skip(f"Triton's bundled NVIDIA tools are missing: {reason}")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "lowrank_infer.kernels.aot"], input=json.dumps(CASES),
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    return {_case_id(case): case["launches"] for case in json.loads(run.stdout)}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fits_sm90_without_spills(compiled, case, record_property):
    launches = compiled[_case_id(case)]
    assert launches, "the path launched no kernel"
    record_property("sm90", launches)
    for launch in launches:
        mma = "wgmma" if launch["uses_wgmma"] else "mma.sync" if launch["uses_mma_sync"] else "no mma"
        print(f"{launch['kernel']}: {launch['n_regs']} registers, {launch['n_spills']} spilled words, "
              f"{launch['shared']} B shared, {mma}; {launch['config']}")
    for launch in launches:
        assert launch["n_spills"] == 0, f"{launch['kernel']} spills {launch['n_spills']} words: {launch}"
        assert launch["shared"] <= SM90_MAX_SHARED_BYTES, f"{launch['kernel']} needs {launch['shared']} B: {launch}"


DECODE_16_BIT = [case for case in CASES if case["dtype"] != "float32" and "decode" in case["path"]]


@pytest.mark.parametrize("case", DECODE_16_BIT, ids=_case_id)
def test_decode_shrink_puts_the_weights_on_wgmma(compiled, case):
    """Swap-AB: 64 rank rows of Vᵀ are the MMA's M side, so Hopper's wgmma runs the shrink."""
    (shrink,) = [launch for launch in compiled[_case_id(case)] if launch["kernel"] == "decode_shrink"]
    assert shrink["config"]["BLOCK_K"] == 64 and shrink["uses_wgmma"], shrink


@pytest.mark.parametrize("case", [case for case in CASES if "decode" in case["path"]], ids=_case_id)
def test_pdl_kernels_wait_on_the_grid_dependency(compiled, case):
    """Built for PDL, each decode kernel prefetches its weights to L2 and waits on the previous
    grid (griddepcontrol.wait) before reading activations; built without, it does neither."""
    for launch in compiled[_case_id(case)]:
        pdl = bool(case.get("pdl"))
        assert launch["config"]["launch_pdl"] == pdl
        assert launch["uses_griddepcontrol"] == pdl and launch["prefetches_l2"] == pdl, launch


@pytest.mark.parametrize("case", [case for case in CASES if case["path"] == "shrink_expand"
                                  and case["dtype"] != "float32"], ids=_case_id)
def test_prefill_gemm_tiles_use_wgmma(compiled, case):
    """The tiled GEMMs of long 16-bit prefills (``triton_fp32`` backend) run on wgmma."""
    for launch in compiled[_case_id(case)]:
        assert launch["uses_wgmma"] or launch["kernel"].endswith(".reduce"), launch
