"""Writes that never leave a half-written file or directory that looks whole."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_directory", "atomic_save_tensors", "atomic_write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic_file(path, write)


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file beside ``path`` and rename it into place."""
    from safetensors.torch import save_file  # only writers of tensors pay for the import

    def write(tmp: str) -> None:
        save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    _atomic_file(path, write)


def _atomic_file(path: str | os.PathLike, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give it an ordinary file's mode
        os.replace(tmp, path)
        _fsync_directory(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_directory(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename into it) durable; a no-op where directories cannot
    be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _finish_tree(root: Path) -> None:
    """Make ``root`` ready to publish, in one walk over it.

    Modes: what a plain ``mkdir``/``open`` would give (umask applied). ``mkdtemp`` makes 0700 and
    some writers (safetensors via transformers) make 0600 files, yet a checkpoint must be readable
    by whoever may read its parent directory. Durability: every file and directory is flushed to
    disk before the rename publishes it, so that after a power loss a directory renamed into
    place never holds empty or partial files.
    """
    mask = _umask()
    for item in root.rglob("*"):
        if item.is_symlink():
            continue
        if item.is_dir():
            os.chmod(item, 0o777 & ~mask)
            _fsync_directory(item)
        else:
            os.chmod(item, 0o666 & ~mask)
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    os.chmod(root, 0o777 & ~mask)
    _fsync_directory(root)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that replaces ``path`` when the block succeeds.

    On an exception the temporary directory is removed and ``path`` is left as it was. An
    existing ``path`` is moved aside before the rename and deleted after it; if the rename
    fails, it is moved back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _finish_tree(tmp)
        _replace_directory(tmp, path)
        _fsync_directory(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_directory(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``, setting an existing ``path`` aside (and back on failure)."""
    if not path.exists():
        os.replace(new, path)
        return
    # A fresh name: a set-aside directory left by a crashed save must not block this one.
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, aside / path.name)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside / path.name, path)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)
