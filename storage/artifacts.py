"""The artifact store under ARTIFACT_DIR.

Blobs are content-addressed (``blobs/sha256/ab/abcdef…``). Everything is written under ``tmp/``
first, fsynced, and renamed into place, so a crash never leaves a half-written file or directory
under a real name; a leftover ``tmp/`` entry is garbage that ``sweep_tmp`` removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    path: Path
    size: int
    created: bool  # False when an identical blob was already stored


class ArtifactStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / "tmp"

    def _ensure(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def put_bytes(self, data: bytes) -> StoredBlob:
        return self._put(iter([data]))

    def put_stream(self, stream: BinaryIO) -> StoredBlob:
        return self._put(iter(lambda: stream.read(_CHUNK), b""))

    def _put(self, chunks: Iterator[bytes]) -> StoredBlob:
        self._ensure()
        digest = hashlib.sha256()
        tmp = self.tmp / f"blob-{uuid.uuid4().hex}"
        size = 0
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            final = self.blob_path(digest.hexdigest())
            if final.exists():
                tmp.unlink()
                return StoredBlob(digest.hexdigest(), final, size, created=False)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return StoredBlob(digest.hexdigest(), final, size, created=True)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def read_bytes(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    def delete_blob(self, sha256: str) -> None:
        self.blob_path(sha256).unlink(missing_ok=True)

    @contextmanager
    def staged_dir(self, relpath: str) -> Iterator[Path]:
        """Yield an empty temporary directory; on success it is renamed to ``root/relpath``; on
        any error it is removed and nothing appears under ``relpath``."""
        final = self.path(relpath)
        if final.exists():
            raise FileExistsError(f"artifact already exists: {relpath}")
        self._ensure()
        tmp = self.tmp / f"dir-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            yield tmp
            _fsync_tree(tmp)  # the contents are on disk before the directory gets its name
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def path(self, relpath: str) -> Path:
        """An artifact path from its name relative to the root; refuses names that escape it."""
        candidate = (self.root / relpath).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise ValueError(f"artifact path escapes the artifact directory: {relpath!r}")
        return candidate

    def sweep_tmp(self, older_than: float = 0.0) -> int:
        """Remove what crashed writers left under tmp/ (only entries untouched for
        ``older_than`` seconds: other processes may be writing the rest); returns how many went."""
        if not self.tmp.exists():
            return 0
        count = 0
        cutoff = time.time() - older_than
        for entry in self.tmp.iterdir():
            if older_than and entry.lstat().st_mtime > cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            count += 1
        return count

    def files(self) -> list[Path]:
        """Every file under the root outside tmp/ (for checks that nothing was written)."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.rglob("*") if p.is_file() and self.tmp not in p.parents)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (deepest first), so that a crash
    after the rename cannot leave a named checkpoint or export with empty or torn files."""
    directories = [root]
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            directories.append(path)
        elif path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(directory)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
