"""The shared early-stopped Adam loop: its learning rate is relative to each tensor's scale."""

import pytest
import torch
from torch import nn

from lowrank_infer.training import Schedule, train_early_stopped


def _one_step(params, targets, lr):
    """Run one step of the loop on ``Σ‖p − t‖²``, with a held-out score that always improves."""
    scores = iter([1.0, 0.5])

    def loss(step):
        return sum((p - t).square().sum() for p, t in zip(params, targets))

    return train_early_stopped(params, loss, lambda: next(scores), Schedule(steps=1, lr=lr, eval_every=1))


def test_each_tensor_steps_by_lr_times_its_rms():
    gen = torch.Generator().manual_seed(0)
    # Scales 1000x apart, as U and V of a whitened SVD can be.
    big = nn.Parameter(torch.randn(6, 4, generator=gen, dtype=torch.float64) * 10)
    small = nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64) * 0.01)
    targets = [torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64)]
    start = [big.detach().clone(), small.detach().clone()]
    report = _one_step([big, small], targets, lr=1e-2)
    assert report.best_step == 1
    for p, p0, t in zip((big, small), start, targets):
        # Adam's first step is lr_t · sign(gradient) (up to its eps), here with lr_t = lr · RMS(tensor).
        step = 1e-2 * float(p0.square().mean().sqrt())
        expected = p0 - step * torch.sign(2 * (p0 - t))
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-3 * step)


def test_an_all_zero_tensor_steps_by_lr_itself():
    zero = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    target = torch.tensor([[1.0, -1.0], [2.0, -2.0], [0.5, -0.5]], dtype=torch.float64)
    _one_step([zero], [target], lr=1e-3)
    torch.testing.assert_close(zero.detach(), 1e-3 * torch.sign(target), rtol=0, atol=1e-9)


def test_decay_lowers_the_rate_linearly_to_one_step_of_it_at_the_end():
    p = nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
    seen = []

    def loss(step):  # a constant gradient of 1: each Adam step moves p by that step's rate (up to eps)
        seen.append(p.detach().clone())
        return p.sum()

    steps, lr = 4, 1e-2
    train_early_stopped([p], loss, lambda: float(p.sum()), Schedule(steps=steps, lr=lr, eval_every=1, decay=True))
    seen.append(p.detach().clone())
    moves = [float((a - b).mean()) for a, b in zip(seen, seen[1:])]
    expected = [lr * 2.0 * (steps - s + 1) / steps for s in range(1, steps + 1)]  # RMS of p is 2
    assert moves == pytest.approx(expected, rel=1e-6)


def test_warmup_raises_the_rate_linearly_and_multiplies_the_decay():
    p = nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
    seen = []

    def loss(step):
        seen.append(p.detach().clone())
        return p.sum()

    steps, warmup, lr = 6, 3, 1e-2
    train_early_stopped([p], loss, lambda: float(p.sum()),
                        Schedule(steps=steps, lr=lr, eval_every=1, decay=True, warmup=warmup))
    seen.append(p.detach().clone())
    moves = [float((a - b).mean()) for a, b in zip(seen, seen[1:])]
    expected = [lr * 2.0 * min(1, s / warmup) * (steps - s + 1) / steps for s in range(1, steps + 1)]
    assert moves == pytest.approx(expected, rel=1e-5)  # the fused Adam rounds its step size


@pytest.mark.parametrize("warmup", [-1, 4, 1.5, True])
def test_warmup_must_be_a_step_count_within_the_run(warmup):
    with pytest.raises(ValueError, match="warmup must be an integer from 0 to steps"):
        Schedule(steps=3, warmup=warmup)


def test_decay_must_be_a_bool():
    with pytest.raises(ValueError, match="decay must be True or False"):
        Schedule(steps=3, decay="linear")
