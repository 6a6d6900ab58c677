"""Providers of ``bench kernels``: the float64 check, the naive baseline and Triton's availability."""

import pytest
import torch

from lowrank_infer.bench.providers import (
    PROVIDERS, Provider, check_provider, default_providers, make_operands, reference, two_matmul_linear,
)


def test_two_matmul_linear_matches_float64_with_bias_and_leading_dims():
    x, U, V = make_operands(24, 40, 8, 6, torch.float64, torch.device("cpu"))
    bias = torch.randn(24, dtype=torch.float64)
    y = two_matmul_linear(x.reshape(2, 3, 40), U, V, bias)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y.reshape(6, 24), reference((x, U, V)) + bias)


@pytest.mark.parametrize("name", ["dense", "torch_lowrank", "two_matmul"])
def test_torch_providers_pass_their_check(name):
    provider = PROVIDERS[name]
    operands = make_operands(48, 32, None if provider.dense else 12, 5, torch.float32, torch.device("cpu"))
    assert check_provider(provider, operands, reference(operands)) is None


def test_check_reports_wrong_shape_dtype_and_nan():
    operands = make_operands(16, 8, 4, 3, torch.float32, torch.device("cpu"))
    ref = reference(operands)
    cases = {
        "returned torch.float32 [3, 15]": lambda x, U, V: torch.zeros(3, 15),
        "returned torch.float64": lambda x, U, V: ref,
        "relative error nan": lambda x, U, V: torch.full((3, 16), float("nan")),
    }
    for message, fn in cases.items():
        assert message in check_provider(Provider("bad", fn), operands, ref)


def test_triton_is_a_default_on_cpu_only_under_its_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert default_providers(torch.device("cpu")) == ["dense", "torch_lowrank", "two_matmul"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in default_providers(torch.device("cpu"))


def test_operands_are_random_and_scaled():
    x, U, V = make_operands(256, 512, 64, 32, torch.float32, torch.device("cpu"))
    y = reference((x, U, V))
    assert 0.3 < y.std().item() < 3 and x.unique().numel() > 1000


def test_rank_major_layout_keeps_values_and_reference():
    from lowrank_infer.bench.providers import PROVIDERS

    operands = make_operands(24, 40, 6, 3, torch.float32, torch.device("cpu"))
    x, U, V = PROVIDERS["triton_rank_major"].prepare(operands)
    assert U.stride() == (1, 24) and V.stride() == (1, 40)
    assert torch.equal(U, operands[1]) and torch.equal(V, operands[2]) and x is operands[0]
