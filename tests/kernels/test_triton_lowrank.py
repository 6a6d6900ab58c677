"""Numerics of the Triton launcher on every path (interpreter on CPU, compiled on CUDA), against float64."""

import itertools
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_infer.kernels import launch_config, triton_lowrank_linear
from lowrank_infer.kernels.launch_config import PATHS

TOKENS = (1, 3, 16, 17, 130)
RANKS = (1, 7, 16, 33, 100)
SIZES = ((24, 24), (24, 37), (37, 24), (37, 37))  # (m, n), odd and even
# Every (T, k) pair once; the sizes cycle case by case, bias flips every fourth case (so each size
# meets both) and every third case has a leading batch dim: each value, not their product.
TOKEN_RANK = [(T, k, *SIZES[i % 4], (i // 4) % 2 == 0, (2,) if i % 3 == 0 else ())
              for i, (T, k) in enumerate(itertools.product(TOKENS, RANKS))]
# Five of those, one per T and k, for each forced path.
FORCED = [(T, k, *SIZES[i % 4], i % 2 == 0, (2,) if i % 2 else ()) for i, (T, k) in enumerate(zip(TOKENS, RANKS))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def check(triton_device, launch, make_inputs, poisoned, assert_matches_reference):
    """``check(T, k, m, n, bias, lead, dtype, path=None)``: run into a NaN-poisoned output, compare."""

    def run(T, k, m, n, bias, lead, dtype, path=None):
        if dtype == torch.bfloat16 and triton_device == "cpu":
            pytest.skip("bfloat16 is broken in the Triton interpreter; covered on CUDA")
        x, U, V, b = make_inputs(T, m, n, k, dtype, triton_device, bias=bias, lead=lead)
        y = launch(x, U, V, b, path=path, out=poisoned(x, m))
        assert_matches_reference(y, x, U, V, b)

    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, k, m, n, bias, lead", TOKEN_RANK)
def test_auto_path(check, T, k, m, n, bias, lead, dtype):
    check(T, k, m, n, bias, lead, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, k, m, n, bias, lead", FORCED)
def test_forced_path(check, path, dtype, T, k, m, n, bias, lead):
    check(T, k, m, n, bias, lead, dtype, path)


LAYOUT_LEAD = {"3d_transposed": (2,), "3d_row_strided": (2,), "x_transposed": (),
               "x_column_slice": (3,), "factors_transposed": (2,)}


def _relayout(layout, x, U, V):
    """Same values as (x, U, V), different memory layout."""
    if layout == "3d_transposed":  # [2, T, n] with strides that reshape cannot merge
        return x.transpose(0, 1).contiguous().transpose(0, 1), U, V
    if layout == "3d_row_strided":  # every other row of a taller tensor
        return torch.stack([x, torch.zeros_like(x)], dim=2).flatten(1, 2)[:, ::2], U, V
    if layout == "x_transposed":  # x[T, n] with stride (1, T)
        return x.T.contiguous().T, U, V
    if layout == "x_column_slice":  # row stride n + 5
        return torch.cat([x, torch.ones_like(x[..., :5])], dim=-1)[..., : x.shape[-1]], U, V
    assert layout == "factors_transposed"  # U, V with stride (1, rows)
    return x, U.T.contiguous().T, V.T.contiguous().T


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUT_LEAD)
def test_layouts(triton_device, launch, make_inputs, poisoned, assert_matches_reference,
                 path, dtype, layout):
    x, U, V, b = make_inputs(17, 37, 24, 33, dtype, triton_device, lead=LAYOUT_LEAD[layout])
    x, U, V = _relayout(layout, x, U, V)
    y = launch(x, U, V, b, path=path, out=poisoned(x, 37))
    assert_matches_reference(y, x, U, V, b)


def test_allocates_output(triton_device, make_inputs, assert_matches_reference):
    x, U, V, b = make_inputs(5, 24, 37, 7, torch.float32, triton_device, lead=(2,))
    y = triton_lowrank_linear(x, U, V, b)
    assert y.shape == (2, 5, 24)
    assert_matches_reference(y, x, U, V, b)


@pytest.mark.parametrize("dtype, bias", [(torch.float32, True), (torch.float16, False)], ids=str)
def test_split_decode_is_deterministic_and_correct(triton_device, launch, make_inputs, assert_matches_reference,
                                                   monkeypatch, split_shrink, counters, dtype, bias):
    """The decode shrink splits n = 37 into 3 ragged pieces of 16 for each of k = 100's 7 row
    tiles; the last program of each tile sums the partials inside the kernel (no reduction
    launch), leaves its counter at 0, and repeated calls agree bit for bit."""
    from lowrank_infer.kernels import triton_lowrank

    configs = {"decode_shrink": split_shrink}
    x, U, V, b = make_inputs(16, 24, 37, 100, dtype, triton_device, bias=bias)
    monkeypatch.setattr(triton_lowrank, "_launch_reduce", lambda *args: pytest.fail("decode launched a reduction"))
    first = launch(x, U, V, b, path="decode", configs=configs)
    assert_matches_reference(first, x, U, V, b)
    for _ in range(2):
        assert torch.equal(first, launch(x, U, V, b, path="decode", configs=configs))
        assert not counters(triton_device).any(), "an arrival counter was left non-zero"


def test_decode_reads_rank_major_and_row_major_v_alike(triton_device, launch, make_inputs, split_shrink):
    """``LowRankLinear`` keeps V rank-major (V.T contiguous); a row-major V gives the same bits."""
    x, U, V, b = make_inputs(3, 24, 37, 33, torch.float32, triton_device)
    rank_major = V.T.contiguous().T
    configs = {"decode_shrink": split_shrink}
    assert torch.equal(launch(x, U, V, b, path="decode", configs=configs),
                       launch(x, U, rank_major, b, path="decode", configs=configs))


@pytest.mark.parametrize(
    "T, k, expected",
    [(1, 4096, "decode"), (32, 7, "decode"), (33, 7, "prefill"), (130, 256, "prefill"),
     (33, 257, "shrink_expand"), (130, 1000, "shrink_expand")],
)
def test_dispatcher_picks_path(triton_device, make_inputs, monkeypatch, T, k, expected):
    triton_lowrank = pytest.importorskip("lowrank_infer.kernels.triton_lowrank")
    taken = []
    recorders = {name: (lambda *args, name=name: taken.append(name), kernels)
                 for name, (_, kernels) in triton_lowrank._PATHS.items()}
    monkeypatch.setattr(triton_lowrank, "_PATHS", recorders)
    triton_lowrank_linear(*make_inputs(T, 24, 37, k, torch.float32, triton_device))
    assert taken == [expected]


@pytest.mark.parametrize("kernel, T", [("decode_shrink", 3), ("decode_expand", 3), ("prefill", 40)])
def test_tuned_table_drives_launch(triton_device, make_inputs, assert_matches_reference, monkeypatch,
                                   tmp_path, kernel, T):
    """The nearest table entry is launched: prefill's 3 m-tiles of 16 split 2 + 1 over 2 m-groups;
    the decode shrink's n (24) split into pieces of 16 with a ragged end; the decode expand's
    37 rows in 3 tiles of 16, k (33) in steps of 16."""
    from lowrank_infer.kernels import triton_lowrank

    name, _ = triton_lowrank._device_info(torch.device(triton_device))
    if kernel == "prefill":
        config = {"BLOCK_T": 16, "BLOCK_N": 16, "BLOCK_M": 16, "M_GROUPS": 2, "num_warps": 4,
                  "num_stages": 2}
    elif kernel == "decode_shrink":
        config = {"BLOCK_K": 16, "BLOCK_N": 16, "SPLIT_N": 2, "num_warps": 4, "num_stages": 2}
    else:
        config = {"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(launch_config, "CONFIG_DIR", tmp_path)
    launch_config.config_file(name).write_text(  # tables hold 16-bit configs
        json.dumps({kernel: {launch_config.bucket_key(2 * T, 32, 32, 32): config}}))
    launched = []
    original = triton_lowrank._configs
    monkeypatch.setattr(triton_lowrank, "_configs", lambda *args: launched.append(original(*args)) or launched[-1])
    x, U, V, b = make_inputs(T, 37, 24, 33, torch.float16, triton_device)
    assert_matches_reference(triton_lowrank_linear(x, U, V, b), x, U, V, b)
    assert [cfgs[kernel] for cfgs in launched] == [config]


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 40), m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 40),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       path=st.sampled_from([None, *PATHS]))
def test_fuzz_shapes(check, T, m, n, k, bias, dtype, path):
    check(T, k, m, n, bias, (), dtype, path)
