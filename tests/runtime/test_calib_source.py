"""CalibSource: text and generated windows in the asked ratio, each part from its own rows."""

import pytest
import torch

from lowrank_infer.calib_source import CalibSource, interleave
from lowrank_infer.data import calibration_ids


class Sampler:
    """Stands in for the model: window ``i`` of a call under ``seed`` is ``1000·seed + 100·i + position``."""

    def __init__(self):
        self.calls = []

    def __call__(self, count, seq_len, seed):
        self.calls.append((count, seq_len, seed))
        return 1000 * seed + 100 * torch.arange(count)[:, None] + torch.arange(seq_len)[None, :]


def _source(generated, pool_size=4, pool_len=8, seed=0):
    fit, held = torch.arange(10_000, 10_200), torch.arange(20_000, 20_040)
    return CalibSource((fit, held), generated, Sampler(), pool_size=pool_size, pool_len=pool_len, seed=seed)


def test_interleave_keeps_the_ratio_in_every_prefix():
    real, generated = torch.zeros(6, 1), torch.ones(2, 1)
    order = interleave(real, generated)[:, 0].tolist()
    assert order == [0, 0, 1, 0, 0, 0, 1, 0]
    assert sorted(order) == sorted(torch.cat([real, generated])[:, 0].tolist())


def test_text_windows_match_calibration_ids_and_generated_come_from_one_call_split_by_part():
    source = _source(0.5, seed=7)
    ids = source.windows(4, 8, "fit", seed_offset=3)
    both = Sampler()(8, 8, 7)  # both parts' pools of 4, fit rows first
    assert torch.equal(ids[0::2], calibration_ids(source.text[0], 2, 8, seed=10))
    assert torch.equal(ids[1::2], both[:2])
    held = source.windows(4, 8, "held")
    assert torch.equal(held[0::2], calibration_ids(source.text[1], 2, 8, seed=7))
    assert torch.equal(held[1::2], both[4:6])
    assert source.sample.calls == [(8, 8, 7)]  # sampled once, for both parts
    source.windows(2, 8, "fit")
    assert len(source.sample.calls) == 1


def test_shorter_windows_are_cut_from_the_pool_and_reused_in_turn():
    source = _source(1.0, pool_size=2, pool_len=8)
    ids = source.windows(6, 4, "fit")
    pool = Sampler()(4, 8, 0)[:2]
    pieces = [pool[0, :4], pool[0, 4:], pool[1, :4], pool[1, 4:]]
    assert torch.equal(ids, torch.stack(pieces + pieces[:2]))


def test_without_reuse_each_generated_piece_serves_once_and_the_text_fills_the_rest():
    source = _source(0.5, pool_size=2, pool_len=8)
    ids = source.windows(10, 4, "fit", seed_offset=1, reuse_generated=False)
    pool = Sampler()(4, 8, 0)[:2]
    pieces = torch.stack([pool[0, :4], pool[0, 4:], pool[1, :4], pool[1, 4:]])  # 4 distinct, not 5
    assert torch.equal(ids, interleave(calibration_ids(source.text[0], 6, 4, seed=1), pieces))
    # Asking for no more than the pieces, or with no text to fill in, changes nothing.
    assert torch.equal(source.windows(6, 4, "fit", reuse_generated=False), source.windows(6, 4, "fit"))
    generated_only = CalibSource(None, 1.0, Sampler(), pool_size=2, pool_len=8)
    assert torch.equal(generated_only.windows(6, 4, "fit", reuse_generated=False), generated_only.windows(6, 4, "fit"))


def test_all_text_never_samples():
    source = CalibSource((torch.arange(100), torch.arange(100, 120)), 0.0, None, pool_size=0, pool_len=8)
    assert torch.equal(source.windows(3, 8, "fit"), calibration_ids(torch.arange(100), 3, 8, seed=0))


@pytest.mark.parametrize("make, words", [
    (lambda: _source(1.5), "must be in [0, 1]"),
    (lambda: CalibSource(None, 0.5, Sampler(), pool_size=2, pool_len=8), "calibration text needed"),
    (lambda: CalibSource((torch.arange(9), torch.arange(9)), 0.5, None, pool_size=2, pool_len=8), "need a model"),
])
def test_bad_settings_are_named(make, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        make()


def test_windows_longer_than_the_generated_ones_or_the_text_part_are_refused():
    with pytest.raises(ValueError, match="longer than the 8 the model generated"):
        _source(0.5).windows(2, 16, "fit", what="healing")
    with pytest.raises(ValueError, match="held-out 10% of the calibration text, which has only 40 tokens"):
        _source(0.0).windows(2, 64, "held")
    with pytest.raises(ValueError, match="part must be one of"):
        _source(0.5).windows(2, 8, "test")


def test_short_samples_are_joined_end_to_end_into_the_pool_rows():
    source = CalibSource((torch.arange(100), torch.arange(100, 120)), 1.0, Sampler(), pool_size=2, pool_len=8,
                         seed=3, sample_len=3)
    ids = source.windows(2, 8, "held")
    short = Sampler()(12, 3, 3)  # 2 parts x 2 rows x ceil(8 / 3) samples, fit rows first
    rows = short.reshape(4, 9)[:, :8]
    assert torch.equal(ids, rows[2:])
    assert torch.equal(source.windows(2, 8, "fit"), rows[:2])
    assert source.sample.calls == [(12, 3, 3)]


@pytest.mark.parametrize("sample_len", [1, 9])
def test_sample_lengths_outside_the_window_are_refused(sample_len):
    with pytest.raises(ValueError, match=f"generated samples must be 2 to 8 tokens long .*got {sample_len}"):
        CalibSource(None, 1.0, Sampler(), pool_size=2, pool_len=8, sample_len=sample_len)
