"""Text for calibration and evaluation: files, or Hugging Face datasets when reachable."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lowrank_infer.sampling import sample_windows

__all__ = ["DATASETS", "GENERATED", "HELD_OUT_FRACTION", "generated_ids", "PYDOC_MODULES", "calibration_ids", "calibration_split", "clean_calibration_text", "load_text",
           "python_docstrings", "shared_data_file", "split_held_out", "tokenize_text"]

# name -> (datasets.load_dataset positional args, keyword args, split for evaluation, split for
# calibration, text column). C4 is read from its first validation and training shards, as the
# GPTQ / SVD-LLM code does, rather than downloading the whole corpus.
_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
DATASETS = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {}, "test", "train", "text"),
    "c4": (("allenai/c4",), {"data_files": _C4_FILES}, "validation", "train", "text"),
}


# An off-domain evaluation text that ships with every Python: the docstrings of these standard
# library modules (technical English and code, far from Wikipedia prose). For evaluation only:
# a model must never be calibrated, tuned or stopped on the text it is judged by.
PYDOC = "python-docs"
PYDOC_MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "csv", "datetime", "decimal", "email.message",
    "functools", "http.client", "inspect", "itertools", "json", "logging", "pathlib", "pickle", "re", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "unittest",
    "urllib.request", "xml.etree.ElementTree", "zipfile",
)


def python_docstrings() -> str:
    """The docstrings of :data:`PYDOC_MODULES` and of the classes, functions and methods they
    define, in a fixed order, joined with blank lines (the same text for one Python version)."""
    import importlib
    import inspect

    seen, docs = set(), []

    def add(obj) -> None:
        doc = inspect.getdoc(obj)
        if doc and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    for name in PYDOC_MODULES:
        module = importlib.import_module(name)
        add(module)
        for _, member in sorted(vars(module).items()):
            if (inspect.isclass(member) or inspect.isfunction(member)) and member.__module__ == name:
                add(member)
                for _, method in sorted(vars(member).items()) if inspect.isclass(member) else ():
                    if inspect.isfunction(method):
                        add(method)
    return "\n\n".join(docs)


def shared_data_file(*parts: str) -> Path | None:
    """A file under ``$LOWRANK_INFER_DATA`` (e.g. ``wikitext2/test.raw.txt``), if set and present."""
    root = os.environ.get("LOWRANK_INFER_DATA")
    if not root:
        return None
    path = Path(root, *parts)
    return path if path.is_file() else None


def load_text(source: str, *, split: str = "eval") -> str:
    """Raw text from a file path or a dataset name (``wikitext2``, ``c4``), rows joined with ``"\\n\\n"``.

    Args:
        source: a text file, a name in :data:`DATASETS` (needs ``datasets`` and the hub), or
            ``"python-docs"`` (Python's own docstrings, for off-domain evaluation).
        split: ``"eval"`` (the dataset's test split) or ``"calib"`` (its training split).
    """
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if source == PYDOC:
        if split != "eval":
            raise ValueError(f"{PYDOC!r} is an evaluation text only: never calibrate on what you evaluate on")
        return python_docstrings()
    if source not in DATASETS:
        raise ValueError(f"text source {source!r} is neither an existing file nor a known dataset ({', '.join(DATASETS)})")
    args, kwargs, eval_split, calib_split, column = DATASETS[source]
    try:
        import datasets
    except ImportError:
        raise ValueError(f"dataset {source!r} needs the datasets package (pip install 'lowrank-infer[eval]'), or pass a text file") from None
    try:
        rows = datasets.load_dataset(*args, split=eval_split if split == "eval" else calib_split, **kwargs)[column]
    except (OSError, ConnectionError, ValueError) as err:  # offline, or the hub refused
        raise ValueError(f"could not load dataset {source!r} from the Hugging Face hub ({err}); pass a text file") from None
    return "\n\n".join(rows)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one ``[tokens]`` LongTensor (no special tokens added)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def calibration_ids(tokens: torch.Tensor, samples: int, seq_len: int, *, seed: int = 0) -> torch.Tensor:
    """``[samples, seq_len]`` windows at random (seeded) places of a token stream, in random order,
    no two overlapping while the stream has room for them all (beyond that, in rounds of as many
    disjoint windows as it holds).

    Disjoint because the long sets repeat text otherwise: healing's 304 text windows of 512 tokens,
    drawn at independent offsets from the 215k tokens of WikiText-2 validation's fitting part,
    would hold about 111k distinct tokens of their 156k (half the stream); disjoint, all 156k (72 %).
    """
    if samples < 1 or seq_len < 1:
        raise ValueError(f"calibration needs samples >= 1 and seq_len >= 1, got {samples} and {seq_len}")
    if tokens.numel() < seq_len:
        raise ValueError(f"calibration text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    room = tokens.numel() // seq_len
    starts = torch.cat([_disjoint_starts(tokens.numel(), min(room, samples - done), seq_len, generator)
                        for done in range(0, samples, room)])
    starts = starts[torch.randperm(samples, generator=generator)]
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def _disjoint_starts(length: int, count: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Starts of ``count`` non-overlapping windows of ``seq_len`` in ``length`` tokens: the room
    left over is cut into ``count + 1`` random gaps (sorted uniform cut points), one before each."""
    cuts = torch.randint(0, length - count * seq_len + 1, (count,), generator=generator).sort().values
    return cuts + torch.arange(count) * seq_len


# Word-level releases (WikiText's *.tokens files) replace rare words by this marker, which no real
# text holds: fitted on, it teaches the whitening a token the model will never be asked about.
_UNK = re.compile(r" ?<unk>")
# The tail of the calibration tokens kept for decisions that must not see the fitting windows
# (healing's early stop).
HELD_OUT_FRACTION = 0.1


def clean_calibration_text(text: str) -> str:
    """``text`` without ``<unk>`` markers (the word before a removed marker keeps its space)."""
    return _UNK.sub("", text)


def split_held_out(tokens: torch.Tensor, fraction: float = HELD_OUT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, held_out)``: the token stream cut once, the last ``fraction`` held out, so windows drawn
    from one part never overlap the other."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    cut = tokens.numel() - int(tokens.numel() * fraction)
    return tokens[:cut], tokens[cut:]


def calibration_split(source: str, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, held_out)`` tokens of a calibration text, cleaned of ``<unk>`` markers and split
    as compress does it: nothing is fitted on the held-out part."""
    return split_held_out(tokenize_text(tokenizer, clean_calibration_text(load_text(source, split="calib"))))


# The calibration source that needs no data: the model writes its own windows.
GENERATED = "generated"


@torch.no_grad()
def generated_ids(model, tokenizer, samples: int, seq_len: int, *, seed: int = 0, batch_size: int = 8,
                  top_p: float = 0.95, progress: bool = False) -> torch.Tensor:
    """``[samples, seq_len]`` windows the model samples itself, from its BOS token (nucleus sampling).

    A user without calibration text can still calibrate on what the model itself finds likely,
    which is, by construction, in the model's own domain rather than one corpus's. The same
    ``seed`` gives the same windows (each batch is sampled under ``seed + batch index``).
    """
    if samples < 1 or seq_len < 2:
        raise ValueError(f"generated calibration needs samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("generated calibration starts from the tokenizer's BOS (or EOS) token, and it has neither")
    device = next(model.parameters()).device
    banned = _end_tokens(model, tokenizer)
    windows = []
    batches = range(0, samples, batch_size)
    for index, first in enumerate(tqdm(batches, desc="generating calibration", unit="batch", disable=not progress)):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + index)
            windows.append(sample_windows(model, start, min(batch_size, samples - first), seq_len, top_p=top_p,
                                          banned=banned))
    return torch.cat(windows)


def _end_tokens(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and the model's generation EOS ids (none, one, or a list): tokens that
    would end a window early, so never sampled."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
    return sorted({t for t in (tokenizer.eos_token_id, *ids) if t is not None})
