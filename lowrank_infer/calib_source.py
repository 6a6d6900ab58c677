"""Where a compress run's windows come from: a calibration text, the model's own samples, or a mix.

A run asks for windows of two parts. The *fit* part feeds the whitening statistics and healing's
training; the *held* part feeds every choice made on the model's output (ARA's training, D-Rank's
``beta="auto"``, where refinement and healing stop), so no choice is scored on the windows that
were fitted. Of a text the fit part is its first 90 % and the held part its last 10 %; of the
model's own samples each part has its own rows of one seeded sampling call (one call: decoding
reads every weight once per token step for the whole batch, so one batch that holds both parts
costs less than a batch for each).

Mixing both pulls the statistics toward what the model writes on its own, which is its
training distribution rather than one corpus's: whitening fitted on WikiText alone protects the
directions WikiText excites and lets other text pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from lowrank_infer.data import HELD_OUT_FRACTION, calibration_ids

__all__ = ["PARTS", "CalibSource", "interleave"]

PARTS = ("fit", "held")


def interleave(real: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """The rows of both, merged so that every prefix holds them in about the ratio of their
    counts (callers score on the first few windows only)."""
    keys = [((i + 0.5) / len(real), 0, i) for i in range(len(real))]
    keys += [((i + 0.5) / len(generated), 1, i) for i in range(len(generated))]
    return torch.stack([(real, generated)[source][i] for _, source, i in sorted(keys)])


@dataclass
class CalibSource:
    """The windows of one run: ``generated`` of each set sampled by the model, the rest cut from a text.

    Attributes:
        text: ``(fit, held)`` token streams of the cleaned calibration text; ``None`` when every
            window is generated.
        generated: fraction of every set of windows the model samples, in [0, 1].
        sample: ``(count, seq_len, seed) -> [count, seq_len]`` the model's own windows (needed
            when ``generated > 0``).
        pool_size: generated windows per part (``round(generated · calibration windows)``), each
            ``pool_len`` tokens long, sampled for both parts at once (fit rows first) under
            ``seed``; shorter windows are cut from them, and a set that asks for more reuses them
            in turn (or, with ``reuse_generated=False``, takes the rest from the text).
        sample_len: tokens per sample (``None``: ``pool_len``). Shorter samples, each from the
            model's start token, are concatenated into the pool's rows: the same tokens cover
            more of what the model writes about, since one sample tends to stay on one topic.
        seed: the base seed: the generated pools' and, with offsets, each set's text windows'.
    """

    text: tuple[torch.Tensor, torch.Tensor] | None
    generated: float
    sample: Callable[[int, int, int], torch.Tensor] | None
    pool_size: int
    pool_len: int
    seed: int = 0
    sample_len: int | None = None
    _samples: torch.Tensor | None = field(default=None, repr=False)  # both parts' pools, fit rows first

    def __post_init__(self):
        if not 0.0 <= self.generated <= 1.0:
            raise ValueError(f"the generated fraction of calibration windows must be in [0, 1], got {self.generated!r}")
        if self.generated < 1.0 and self.text is None:
            raise ValueError("calibration text needed for the windows the model does not generate")
        if self.generated > 0.0 and self.sample is None:
            raise ValueError("generated calibration windows need a model to sample them")
        if self.sample_len is not None and not 2 <= self.sample_len <= self.pool_len:
            raise ValueError(f"generated samples must be 2 to {self.pool_len} tokens long (the window length), "
                             f"got {self.sample_len}")

    def split(self, count: int) -> tuple[int, int]:
        """``(from text, generated)`` windows of a set of ``count``."""
        generated = round(self.generated * count)
        return count - generated, generated

    def windows(self, count: int, seq_len: int, part: str, *, seed_offset: int = 0, what: str = "calibration",
                reuse_generated: bool = True) -> torch.Tensor:
        """``[count, seq_len]`` windows of ``part`` ("fit" or "held"), text and generated interleaved.

        Args:
            seed_offset: added to the seed that picks the text windows (different sets of one part).
            what: what the windows are for, named in errors.
            reuse_generated: ``False``: at most one window of each generated piece, the rest of the
                generated share from the text (where there is one).
        """
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        real, generated = self.split(count)
        if not reuse_generated and self.text is not None:
            generated = min(generated, max(self.pool_size, 1) * (self.pool_len // seq_len))
            real = count - generated
        rows = []
        if real:
            rows.append(self._text_windows(real, seq_len, part, self.seed + seed_offset, what))
        if generated:
            rows.append(self._generated(generated, seq_len, part, what))
        return rows[0] if len(rows) == 1 else interleave(*rows)

    def _text_windows(self, count: int, seq_len: int, part: str, seed: int, what: str) -> torch.Tensor:
        tokens = self.text[PARTS.index(part)]
        # Text windows may overlap; a part shorter than one window cannot give any.
        if tokens.numel() < seq_len:
            where = f"the held-out {HELD_OUT_FRACTION:.0%}" if part == "held" else "the fitting part"
            raise ValueError(f"{what} draws windows of {seq_len} tokens from {where} of the calibration text, which "
                             f"has only {tokens.numel():,} tokens: pass a longer --calib-file")
        return calibration_ids(tokens, count, seq_len, seed=seed)

    def _generated(self, count: int, seq_len: int, part: str, what: str) -> torch.Tensor:
        if seq_len > self.pool_len:
            raise ValueError(f"{what} asks for windows of {seq_len} tokens, longer than the {self.pool_len} the model "
                             "generated (--seq-len)")
        size = max(self.pool_size, 1)
        if self._samples is None:
            self._samples = self._sample_pool(size * len(PARTS))
        # Each part its own rows: held never shares a window with fit.
        pool = self._samples[PARTS.index(part) * size:(PARTS.index(part) + 1) * size]
        pieces = pool[:, : pool.shape[1] // seq_len * seq_len].reshape(-1, seq_len)
        return pieces[torch.arange(count) % pieces.shape[0]]

    def _sample_pool(self, rows: int) -> torch.Tensor:
        """``[rows, pool_len]``: each row ``pool_len // sample_len`` (rounded up) samples end to end, cut to length."""
        length = self.sample_len or self.pool_len
        per_row = -(-self.pool_len // length)
        samples = self.sample(rows * per_row, length, self.seed)
        return samples.reshape(rows, per_row * length)[:, :self.pool_len]
