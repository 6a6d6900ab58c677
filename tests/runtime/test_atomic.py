"""Atomic writes: all or nothing, and ordinary file modes on what lands."""

from __future__ import annotations

import os
import stat

import pytest

from lowrank_infer.atomic import atomic_directory, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_directory_lands_whole_with_ordinary_modes(tmp_path, umask_022):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        private = tmp / "sub" / "weights.bin"
        private.write_bytes(b"abc")
        os.chmod(private, 0o600)  # as some writers leave their files
    assert (target / "sub" / "weights.bin").read_bytes() == b"abc"
    assert (_mode(target), _mode(target / "sub"), _mode(target / "sub" / "weights.bin")) == (0o755, 0o755, 0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_directory_leaves_the_old_one(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_final_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    import lowrank_infer.atomic as atomic

    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(target) and "tmp-" in os.fspath(src):
            raise OSError("disk gone")  # the rename of the new directory into place
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_leftover_of_a_crashed_replace_does_not_block_the_next(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    stale = tmp_path / f".ckpt.old-{os.getpid()}"  # the set-aside name an earlier version used
    stale.mkdir()
    (stale / "x").write_text("left by a crash")
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", stale.name])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names synced files through /proc (Linux)")
def test_files_reach_the_disk_before_the_rename_publishes_them(tmp_path, monkeypatch):
    import lowrank_infer.atomic as atomic

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with atomic_directory(tmp_path / "ckpt") as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "b.json").write_text("{}")
    first_replace = next(i for i, (kind, _) in enumerate(events) if kind == "replace")
    synced = {os.path.basename(path) for kind, path in events[:first_replace] if kind == "fsync"}
    assert {"a.bin", "b.json"} <= synced


def test_text_file_replaced_whole(tmp_path, umask_022):
    path = tmp_path / "plan.json"
    path.write_text("old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
