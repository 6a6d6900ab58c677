"""A compression's work directory: each finished block on disk, so memory stays bounded and a
killed run resumes where it stopped.

Layout (every file written under a temporary name and renamed):

- ``manifest.json``: the run's settings and how many blocks are finished.
- ``block-NNNN.safetensors``: the spectra of block ``NNNN``'s layers (``<layer>/sigma`` float64,
  ``<layer>/left`` and ``<layer>/right`` float32), written by rank 0.
- ``hidden-rR-P.safetensors``: rank ``R``'s calibration hidden states entering the block named in
  its metadata; two files alternate (``P`` = block parity), so the input of the last finished
  block survives a crash while the next one is written.

A block counts as finished only once the manifest says so, and the manifest is updated after
the block's files are in place: whatever point a run is killed at, the manifest names blocks
whose files are whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from lowrank_infer.atomic import atomic_save_tensors, atomic_write_text
from lowrank_infer.distributed import Ranks
from lowrank_infer.factorize import Spectrum

__all__ = ["StoredSpectrum", "WorkDir"]

MANIFEST = "manifest.json"
FORMAT = 1


class StoredSpectrum(Spectrum):
    """A :class:`Spectrum` whose singular values are in memory and whose factors stay on disk
    until asked for; ``factors(rank)`` reads only the first ``rank`` columns."""

    def __init__(self, path: Path, name: str, sigma: torch.Tensor, shape: tuple[int, int, int], whitened: bool,
                 shrinkage: float = 0.0):
        self.path, self.name, self.sigma, self.whitened, self.shrinkage = path, name, sigma, whitened, shrinkage
        self._shape = shape  # (out_features, in_features, max_rank)

    def __repr__(self) -> str:
        return f"StoredSpectrum({self.name!r}, {self._shape}, whitened={self.whitened}, path={str(self.path)!r})"

    @property
    def out_features(self) -> int:
        return self._shape[0]

    @property
    def in_features(self) -> int:
        return self._shape[1]

    @property
    def max_rank(self) -> int:
        return self._shape[2]

    @property
    def left(self) -> torch.Tensor:
        return self._read("left", self.max_rank)

    @property
    def right(self) -> torch.Tensor:
        return self._read("right", self.max_rank)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} is outside the stored factors' range 1..{self.max_rank}")
        return self._read("left", rank), self._read("right", rank)

    def _read(self, part: str, rank: int) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            return f.get_slice(f"{self.name}/{part}")[:, :rank].contiguous()


class WorkDir:
    """The work directory of one compression run (see the module docstring).

    Args:
        path: the directory; created when missing.
        settings: what makes two runs the same (model, data, method, plan, …); a resume with
            other settings is refused.
        resume: continue the run the directory holds; without it, a directory that holds a
            run is refused rather than overwritten.
        ranks: this process's place in the process group (rank 0 writes the shared files).

    Raises:
        ValueError: a directory that holds a run without ``resume``, or a run with other
            settings; a non-empty directory that is not a work directory.
    """

    def __init__(self, path: str | Path, settings: Mapping[str, Any], *, resume: bool, ranks: Ranks = Ranks()):
        self.path, self.ranks = Path(path), ranks
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the manifest
        # Rank 0 alone reads and starts the manifest, and tells the others what it found: a
        # rank that looked itself could see the manifest rank 0 has just written as another run's.
        outcome = None
        if ranks.main:
            try:
                outcome = self._open(resume)
            except ValueError as err:
                outcome = err
        outcome = ranks.broadcast_object(outcome)
        if isinstance(outcome, ValueError):
            raise outcome
        self.blocks_done = outcome

    def _open(self, resume: bool) -> int:
        """The number of finished blocks, after starting a manifest or checking the one there."""
        manifest = self._read_manifest()
        if manifest is None:
            self.blocks_done = 0
            self._write_manifest()
            return 0
        self._check_resumable(manifest, resume)
        return int(manifest["blocks_done"])

    def _read_manifest(self) -> dict | None:
        file = self.path / MANIFEST
        if not file.exists():
            if self.path.exists() and any(not p.name.startswith(".") for p in self.path.iterdir()):
                raise ValueError(f"--work-dir {self.path} is not empty and holds no {MANIFEST}: "
                                 "choose an empty or new directory")
            return None
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{file} is unreadable ({err}); remove the work directory to start over") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{file} has format {manifest.get('format')!r}; this version reads {FORMAT}")
        return manifest

    def _check_resumable(self, manifest: dict, resume: bool) -> None:
        if not resume:
            raise ValueError(f"--work-dir {self.path} holds a run ({manifest['blocks_done']} blocks finished): "
                             "pass --resume to continue it, or choose an empty directory")
        old = manifest["settings"]
        differ = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
        if differ:
            detail = "; ".join(f"{k}: {old.get(k)!r} then, {self.settings.get(k)!r} now" for k in differ[:4])
            raise ValueError(f"cannot resume {self.path}: it was started with other settings ({detail})")

    def _write_manifest(self) -> None:
        manifest = {"format": FORMAT, "blocks_done": self.blocks_done, "settings": self.settings}
        atomic_write_text(self.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    def _block_file(self, index: int) -> Path:
        return self.path / f"block-{index:04d}.safetensors"

    def _hidden_file(self, block: int) -> Path:
        return self.path / f"hidden-r{self.ranks.rank}-{block % 2}.safetensors"

    def finish_block(self, index: int, spectra: Mapping[str, Spectrum]) -> None:
        """Record block ``index`` as finished with these spectra (rank 0 writes; all ranks wait)."""
        if index != self.blocks_done:
            raise ValueError(f"block {index} finished out of order; {self.blocks_done} blocks are done")
        if self.ranks.main:
            tensors, meta = {}, {}
            for name, s in spectra.items():
                tensors.update({f"{name}/sigma": s.sigma, f"{name}/left": s.left, f"{name}/right": s.right})
                meta[name] = {"whitened": s.whitened, "shrinkage": s.shrinkage}
            atomic_save_tensors(self._block_file(index), tensors, {"layers": json.dumps(meta)})
        self.ranks.barrier()  # every rank's hidden states for the next block are in place too
        self.blocks_done = index + 1
        if self.ranks.main:
            self._write_manifest()

    def spectra(self) -> dict[str, StoredSpectrum]:
        """Every finished block's spectra, factors left on disk (rank 0's view)."""
        out = {}
        for index in range(self.blocks_done):
            path = self._block_file(index)
            with safe_open(path, framework="pt") as f:
                layers = json.loads(f.metadata()["layers"])
                for name, meta in layers.items():
                    m, k = f.get_slice(f"{name}/left").get_shape()
                    n = f.get_slice(f"{name}/right").get_shape()[0]
                    out[name] = StoredSpectrum(path, name, f.get_tensor(f"{name}/sigma"), (m, n, k), meta["whitened"],
                                               meta.get("shrinkage", 0.0))
        return out

    def save_hidden(self, block: int, hidden: list[torch.Tensor]) -> None:
        """This rank's hidden states entering block ``block`` (one tensor per batch)."""
        tensors = {f"batch{b}": h.detach().cpu() for b, h in enumerate(hidden)}
        atomic_save_tensors(self._hidden_file(block), tensors, {"block": str(block), "batches": str(len(hidden))})

    def load_hidden(self, block: int) -> list[torch.Tensor]:
        """The hidden states :meth:`save_hidden` wrote for ``block``."""
        path = self._hidden_file(block)
        if not path.exists():
            raise ValueError(f"{path} is missing: the work directory cannot resume at block {block}")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            if int(meta["block"]) != block:
                raise ValueError(f"{path} holds the inputs of block {meta['block']}, not {block}")
            return [f.get_tensor(f"batch{b}") for b in range(int(meta["batches"]))]
