"""Kernel-test setup: Triton's interpreter on CPU-only machines, devices, the fp64 oracle."""

import importlib.util
import os

import pytest
import torch

# @triton.jit decides at decoration time whether to interpret, so this must precede any
# import of lowrank_infer.kernels.triton_lowrank. With a GPU, kernels compile for real and
# the CPU Triton tests skip.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Relative Frobenius error vs float64: output rounding dominates for 16-bit dtypes.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture
def triton_device(device):
    """``device`` where the Triton kernels can run, else skip with the reason."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU Triton runs need TRITON_INTERPRET=1, set by conftest only without CUDA")
    return device


@pytest.fixture
def launch(triton_device):
    """The Triton launcher itself (``triton_lowrank.launch``): forced paths, output buffers, configs."""
    from lowrank_infer.kernels import triton_lowrank

    return triton_lowrank.launch


@pytest.fixture
def make_inputs():
    """``make(T, m, n, k, dtype, device, bias=True, lead=())`` -> x [*lead, T, n], U, V, bias."""

    def make(T, m, n, k, dtype, device, bias=True, lead=()):
        gen = torch.Generator().manual_seed(T * 1_000_003 + m * 1009 + n * 101 + k)
        x = torch.randn(*lead, T, n, generator=gen)
        U = torch.randn(m, k, generator=gen) / k**0.5
        V = torch.randn(n, k, generator=gen) / n**0.5
        b = torch.randn(m, generator=gen) if bias else None
        return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (x, U, V, b))

    return make


@pytest.fixture
def assert_matches_reference():
    """Check ``y`` against ``x.double() @ V.double() @ U.double().T + b`` (relative Frobenius)."""

    def check(y, x, U, V, b):
        ref = x.double() @ V.double() @ U.double().T
        if b is not None:
            ref = ref + b.double()
        assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
        assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite outputs"
        err = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err < TOLERANCE[x.dtype], f"relative error {err:.3g} for {x.dtype}"

    return check


@pytest.fixture
def poisoned():
    """``poisoned(x, m)``: a NaN-filled ``[..., m]`` result buffer for the launcher's ``out``."""

    def make(x, m):
        return torch.full((*x.shape[:-1], m), float("nan"), dtype=x.dtype, device=x.device)

    return make


# The decode shrink split in 3 pieces of 16 along n (37 in the tests: the last one ragged), so
# the in-kernel ordered reduction of the partials runs.
SPLIT_SHRINK = {"BLOCK_K": 16, "BLOCK_N": 16, "SPLIT_N": 3, "num_warps": 4, "num_stages": 2}


@pytest.fixture
def split_shrink(monkeypatch):
    """Every decode shrink launches with :data:`SPLIT_SHRINK`, whatever the table says; the
    fixture's value is that config."""
    from lowrank_infer.kernels import triton_lowrank

    original = triton_lowrank._config
    monkeypatch.setattr(triton_lowrank, "_config", lambda kernel, *args: SPLIT_SHRINK
                        if kernel == "decode_shrink" else original(kernel, *args))
    return SPLIT_SHRINK


@pytest.fixture
def counters():
    """``counters(device)``: the decode shrink's arrival counters in the launcher's workspace."""
    from lowrank_infer.kernels import triton_lowrank

    # The workspace is keyed by tensors' devices, which carry an index ("cuda:0", not "cuda").
    return lambda device: triton_lowrank._WORKSPACE._buffers[torch.empty(0, device=device).device][2]
