from __future__ import annotations

import hashlib
import io

import pytest

from storage.artifacts import ArtifactStore


def test_blobs_are_content_addressed_and_deduplicated(store: ArtifactStore) -> None:
    data = "训练数据\n".encode()
    first = store.put_bytes(data)
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert first.created and first.path.read_bytes() == data
    assert first.path == store.root / "blobs" / "sha256" / first.sha256[:2] / first.sha256
    again = store.put_stream(io.BytesIO(data))
    assert again.sha256 == first.sha256 and not again.created
    assert store.files() == [first.path]


class _Crash(Exception):
    pass


class _BrokenStream(io.RawIOBase):
    """Yields one chunk, then fails as a dropped connection would."""

    def __init__(self) -> None:
        self.calls = 0

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls > 1:
            raise _Crash("connection lost")
        return b"x" * 1000


def test_a_crash_mid_write_leaves_no_file(store: ArtifactStore) -> None:
    with pytest.raises(_Crash):
        store.put_stream(_BrokenStream())  # type: ignore[arg-type]
    assert store.files() == []
    assert list(store.tmp.iterdir()) == []


def test_staged_dir_appears_only_when_complete(store: ArtifactStore) -> None:
    with pytest.raises(_Crash), store.staged_dir("checkpoints/1") as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"half")
        raise _Crash
    assert not store.path("checkpoints/1").exists()
    assert list(store.tmp.iterdir()) == []
    with store.staged_dir("checkpoints/1") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert (store.path("checkpoints/1") / "meta.json").read_text() == "{}"
    with pytest.raises(FileExistsError), store.staged_dir("checkpoints/1"):
        pass


def test_paths_cannot_escape_the_root(store: ArtifactStore) -> None:
    with pytest.raises(ValueError, match="escapes"):
        store.path("../outside")
    with pytest.raises(ValueError, match="sha256"):
        store.blob_path("../../etc/passwd")


def test_sweep_removes_leftovers_of_crashed_writers(store: ArtifactStore) -> None:
    store.tmp.mkdir(parents=True)
    (store.tmp / "blob-dead").write_bytes(b"partial")
    (store.tmp / "dir-dead").mkdir()
    assert store.sweep_tmp() == 2
    assert list(store.tmp.iterdir()) == []


def test_a_sweep_with_an_age_keeps_what_is_being_written(tmp_path) -> None:
    import os
    import time

    store = ArtifactStore(tmp_path / "artifacts")
    store.tmp.mkdir(parents=True)
    old, fresh = store.tmp / "dir-old", store.tmp / "dir-fresh"
    old.mkdir()
    fresh.mkdir()
    day_ago = time.time() - 2 * 86400
    os.utime(old, (day_ago, day_ago))
    assert store.sweep_tmp(older_than=86400) == 1
    assert not old.exists() and fresh.exists()


def test_a_staged_directory_is_on_disk_before_it_gets_its_name(store: ArtifactStore, monkeypatch):
    """Every file of a checkpoint (and the directories holding them) is fsynced before the rename
    that publishes it: a crash after the rename must not leave a named checkpoint with empty files."""
    import os

    synced: list[str] = []
    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        order.append("fsync")
        real_fsync(fd)

    def replace(src, dst) -> None:
        order.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with store.staged_dir("checkpoints/job-1/step-000005") as directory:
        (directory / "adapter_model.safetensors").write_bytes(b"w" * 100)
        (directory / "nested").mkdir()
        (directory / "nested" / "training_state.pt").write_bytes(b"s" * 100)
        staging = str(directory)
    names = {os.path.basename(p) for p in synced[: order.index("rename")]}
    assert {"adapter_model.safetensors", "training_state.pt", "nested"} <= names
    assert staging in synced[: order.index("rename")]
    assert (store.path("checkpoints/job-1/step-000005") / "nested" / "training_state.pt").exists()
