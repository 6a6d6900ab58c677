import sys
import types

import pytest
import torch

from lowrank_infer.data import calibration_ids, load_text


def test_text_file_and_calibration_windows(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello\n\nworld")
    assert load_text(str(path)) == "hello\n\nworld"
    tokens = torch.arange(1000)
    ids = calibration_ids(tokens, 6, 50, seed=3)
    assert ids.shape == (6, 50)
    for row in ids:  # each window is a contiguous slice of the stream
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 50))
    assert torch.equal(ids, calibration_ids(tokens, 6, 50, seed=3))


@pytest.mark.parametrize("name, split, want_args, want_split", [
    ("wikitext2", "eval", ("wikitext", "wikitext-2-raw-v1"), "test"),
    ("wikitext2", "calib", ("wikitext", "wikitext-2-raw-v1"), "train"),
    ("c4", "eval", ("allenai/c4",), "validation"),
])
def test_datasets_are_read_with_the_standard_splits(monkeypatch, name, split, want_args, want_split):
    calls = []

    def load_dataset(*args, split, **kwargs):
        calls.append((args, split, kwargs))
        return {"text": ["a", "b"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_text(name, split=split) == "a\n\nb"
    args, got_split, kwargs = calls[0]
    assert args == want_args and got_split == want_split
    if name == "c4":
        assert kwargs["data_files"][want_split].startswith("en/c4-validation")


def test_unknown_source_and_offline_hub(monkeypatch):
    with pytest.raises(ValueError, match="neither an existing file nor a known dataset"):
        load_text("no-such-file.txt")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ValueError, match="pass a text file"):
        load_text("wikitext2")


def test_calibration_needs_enough_text():
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_ids(torch.arange(10), 2, 64)


def test_every_window_start_can_be_drawn():
    """Starts are uniform over all ``numel - seq_len + 1`` positions, the last one included."""
    tokens = torch.arange(12)
    starts = calibration_ids(tokens, 400, 10, seed=0)[:, 0]
    assert set(starts.tolist()) == {0, 1, 2}
    assert calibration_ids(torch.arange(10), 3, 10).tolist() == [list(range(10))] * 3


def test_windows_do_not_overlap_while_the_stream_has_room():
    tokens = torch.arange(1000)
    for seed in range(5):
        starts = calibration_ids(tokens, 19, 50, seed=seed)[:, 0].sort().values
        assert (starts.diff() >= 50).all() and starts[-1] <= 950
    # The order is shuffled, not the stream's.
    assert any(not torch.equal(s := calibration_ids(tokens, 19, 50, seed=k)[:, 0], s.sort().values) for k in range(3))


def test_more_windows_than_room_come_in_disjoint_rounds():
    """25 windows of 10 from 100 tokens: rounds of 10, 10 and 5, each round's windows disjoint, so
    every token is covered at least twice."""
    ids = calibration_ids(torch.arange(100), 25, 10, seed=1)
    assert ids.shape == (25, 10)
    assert torch.bincount(ids.flatten(), minlength=100).min() >= 2
    assert torch.bincount(ids.flatten(), minlength=100).max() <= 3


def test_python_docstrings_are_an_evaluation_text_only():
    text = load_text("python-docs")
    assert text == load_text("python-docs")  # a fixed order: the same text every time
    assert "Command-line parsing library" in text and len(text) > 100_000
    with pytest.raises(ValueError, match="evaluation text only"):
        load_text("python-docs", split="calib")


def test_generated_windows_are_whole_and_deterministic_under_a_seed():
    from lowrank_infer.data import generated_ids

    from tiny_models import tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    ids = generated_ids(model, tokenizer, 5, 12, seed=3, batch_size=2)
    assert ids.shape == (5, 12) and ids.dtype == torch.long
    assert (ids[:, 0] == tokenizer.bos_token_id).all() and (ids < 128).all()
    assert torch.equal(ids, generated_ids(model, tokenizer, 5, 12, seed=3, batch_size=2))
    assert not torch.equal(ids, generated_ids(model, tokenizer, 5, 12, seed=4, batch_size=2))
    # Sampled, not greedy: windows from one prompt differ.
    assert len({tuple(row) for row in ids.tolist()}) == 5
