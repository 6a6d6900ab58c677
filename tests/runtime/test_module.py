import pytest
import torch
from torch import nn

from lowrank_infer import LowRankLinear


def _ref(x, U, V, b):
    y = x.double() @ V.double() @ U.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5,), (2, 3)])
def test_forward_matches_float64(bias, shape):
    torch.manual_seed(0)
    U, V = torch.randn(24, 6), torch.randn(40, 6)
    b = torch.randn(24) if bias else None
    layer = LowRankLinear.from_factors(U, V, b)
    x = torch.randn(*shape, 40)
    y = layer(x)
    assert y.shape == (*shape, 24)
    torch.testing.assert_close(y.double(), _ref(x, U, V, b), rtol=1e-5, atol=1e-5)


def test_from_linear_is_best_rank_k_approximation():
    torch.manual_seed(0)
    linear = nn.Linear(48, 32)
    layer = LowRankLinear.from_linear(linear, 5)
    assert not layer.is_dense and layer.rank == 5
    W = linear.weight.double()
    err = torch.linalg.matrix_norm(W - layer.dense_weight().double())
    sigma = torch.linalg.svdvals(W)
    # Eckart–Young: the optimal rank-5 error is the norm of the discarded singular values.
    torch.testing.assert_close(err, sigma[5:].square().sum().sqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(layer.bias, linear.bias)


def test_rank_past_break_even_is_dense():
    linear = nn.Linear(16, 8)
    layer = LowRankLinear.from_linear(linear, 6)  # 6·24 = 144 ≥ 128
    assert layer.is_dense and layer.rank is None
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), linear(x))
    assert "rank=dense" in repr(layer)
    assert LowRankLinear.from_linear(linear, None).is_dense


def test_whitening_lowers_data_error():
    torch.manual_seed(0)
    linear = nn.Linear(32, 32, bias=False)
    X = torch.randn(512, 32) @ torch.randn(32, 32) * torch.linspace(0.1, 3, 32)
    gram = X.double().T @ X.double()
    plain = LowRankLinear.from_linear(linear, 6)
    white = LowRankLinear.from_linear(linear, 6, whitening=gram)
    def data_err(layer):
        return torch.linalg.matrix_norm((linear.weight.double() - layer.dense_weight().double()) @ X.double().T)
    assert data_err(white) < 0.9 * data_err(plain)


def test_extra_repr_and_shapes():
    layer = LowRankLinear(40, 24, 6, bias=False)
    assert layer.U.shape == (24, 6) and layer.V.shape == (40, 6)
    assert "rank=6" in repr(layer) and "out_features=24" in repr(layer)


def test_bad_rank_and_factors():
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(8, 8, 0)
    with pytest.raises(ValueError, match="share k"):
        LowRankLinear.from_factors(torch.randn(4, 3), torch.randn(5, 2))
