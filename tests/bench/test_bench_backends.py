"""The benches' backend vocabulary, old result files' names, and the float64 check of one layer call."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lowrank_infer.bench.backends import BACKENDS, backend_of, check_backends, running
from lowrank_infer.bench.operands import check_call, make_operands, reference
from lowrank_infer.kernels import get_backend, get_pdl, lowrank_linear

H100_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "h100"
CPU = torch.device("cpu")


def test_backends_are_dense_and_the_library_s():
    assert BACKENDS == ("dense", "cublas", "triton", "triton_fp32", "torch")
    assert check_backends(["dense", "cublas", "triton", "triton_fp32", "torch"], torch.device("cuda")) == list(BACKENDS)
    assert check_backends(["torch", "dense"], CPU) == ["torch", "dense"]
    with pytest.raises(ValueError, match="unknown backend 'two_matmul' \\(known: dense, cublas, triton, triton_fp32, torch\\)"):
        check_backends(["two_matmul"], torch.device("cuda"))
    with pytest.raises(ValueError, match="on cpu, .* cublas, triton would time torch under another name"):
        check_backends(["dense", "cublas", "triton"], CPU)


def test_running_switches_the_backend_and_restores_it():
    before = get_backend()
    other = next(name for name in BACKENDS[1:] if name != before)
    with running(other):
        assert get_backend() == other
    assert get_backend() == before
    with running("dense"):
        assert get_backend() == before


def test_running_sets_pdl_only_when_asked_and_restores_it():
    before = get_pdl()
    with running("triton", pdl=not before):
        assert (get_backend(), get_pdl()) == ("triton", not before)
    with running("cublas"):
        assert get_pdl() == before
    assert get_pdl() == before


@pytest.mark.parametrize(("row", "backend"), [
    ({"provider": "two_matmul"}, "cublas"), ({"provider": "torch_lowrank"}, "torch"), ({"path": "fused"}, "triton"),
    ({"provider": "triton"}, "triton"), ({"path": "dense"}, "dense"), ({"backend": "torch"}, "torch"),
])
def test_old_rows_read_with_the_new_names(row, backend):
    assert backend_of(row) == backend


def test_committed_h100_results_read_with_the_new_names():
    found = set()
    for path in H100_RESULTS.rglob("*.json"):
        found |= {backend_of(row) for row in json.loads(path.read_text()).get("rows", [])}
    # triton_rank_major: a layout the library never stores, timed once in v1-fused-decode/.
    assert found == {"dense", "cublas", "triton", "triton_rank_major"}


@pytest.mark.parametrize(("fn", "k"), [(F.linear, None), (lowrank_linear, 12)])
def test_dense_and_lowrank_calls_pass_their_check(fn, k):
    operands = make_operands(48, 32, k, 5, torch.float32, CPU)
    assert check_call(fn, operands, reference(operands)) is None


def test_check_reports_wrong_shape_dtype_and_nan():
    operands = make_operands(16, 8, 4, 3, torch.float32, CPU)
    ref = reference(operands)
    cases = {
        "returned torch.float32 [3, 15]": lambda x, U, V: torch.zeros(3, 15),
        "returned torch.float64": lambda x, U, V: ref,
        "relative error nan": lambda x, U, V: torch.full((3, 16), float("nan")),
    }
    for message, fn in cases.items():
        assert message in check_call(fn, operands, ref)


def test_operands_are_random_and_scaled():
    x, U, V = make_operands(256, 512, 64, 32, torch.float32, CPU)
    y = (x.double() @ V.double()) @ U.double().T
    assert torch.equal(reference((x, U, V)), y)
    assert 0.3 < y.std().item() < 3 and x.unique().numel() > 1000
