"""Read an upload (a file, a folder or a zip) into memory as ``{relative name: bytes}``, enforcing
the size limits and refusing unsafe archives before anything is parsed or written.

Archives are never extracted to disk: members are read into memory with their real (not declared)
size counted against the limit, so a zip bomb stops at the limit.
"""

from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.errors import DatasetRejected, Problem

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
_IGNORED_PARTS = {"__MACOSX", ".DS_Store"}


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    max_archive_bytes: int
    max_archive_files: int


def read_upload(path: Path, limits: Limits) -> dict[str, bytes]:
    """The upload's files by relative POSIX name. A single data file maps to its own name."""
    if path.is_symlink():
        raise DatasetRejected(Problem(f"{path.name} is a symbolic link: upload the file itself"))
    if path.is_dir():
        return _read_folder(path, limits)
    if not path.exists():
        raise DatasetRejected(Problem(f"no such file or folder: {path}"))
    size = path.stat().st_size
    if size > limits.max_upload_bytes:
        raise DatasetRejected(
            Problem(
                f"{path.name} is {_mb(size)}, over the upload limit of {_mb(limits.max_upload_bytes)}"
            )
        )
    if size == 0:
        raise DatasetRejected(Problem(f"{path.name} is empty (0 bytes)"))
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        return _read_zip(path, limits)
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DatasetRejected(
            Problem(
                f"{path.name}: unknown file type {path.suffix or '(none)'}; expected "
                ".json, .jsonl, .csv, .tsv, .txt, .zip or a folder with dataset_info.json"
            )
        )
    return {path.name: path.read_bytes()}


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def _unsafe_member_name(name: str) -> str | None:
    if "\\" in name:
        return "has a backslash in its path"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "has '..' in its path"
    return None


def _read_zip(path: Path, limits: Limits) -> dict[str, bytes]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise DatasetRejected(Problem(f"{path.name} is not a readable zip: {exc}")) from exc
    with archive:
        infos = archive.infolist()
        problems: list[Problem] = []
        if len(infos) > limits.max_archive_files:
            raise DatasetRejected(
                Problem(
                    f"{path.name} holds {len(infos)} entries, over the limit of "
                    f"{limits.max_archive_files}"
                )
            )
        for info in infos:
            reason = _unsafe_member_name(info.filename)
            mode = info.external_attr >> 16
            if reason is None and stat.S_ISLNK(mode):
                reason = "is a symbolic link"
            if reason is None and info.flag_bits & 0x1:
                reason = "is encrypted"
            if reason:
                problems.append(Problem(f"zip member {info.filename!r} {reason}", file=path.name))
        if problems:
            raise DatasetRejected(problems)
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_archive_bytes:
            raise DatasetRejected(
                Problem(
                    f"{path.name} would unpack to {_mb(declared)}, over the limit of "
                    f"{_mb(limits.max_archive_bytes)}"
                )
            )
        files: dict[str, bytes] = {}
        total = 0
        for info in infos:
            if info.is_dir() or _ignored(info.filename):
                continue
            budget = limits.max_archive_bytes - total
            try:
                with archive.open(info) as member:
                    data = member.read(budget + 1)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:  # CRC or stream errors
                raise DatasetRejected(
                    Problem(f"zip member {info.filename!r} cannot be read: {exc}", file=path.name)
                ) from exc
            total += len(data)
            if total > limits.max_archive_bytes:  # the header lied about the size
                raise DatasetRejected(
                    Problem(
                        f"{path.name} unpacks to more than the limit of "
                        f"{_mb(limits.max_archive_bytes)}"
                    )
                )
            files[info.filename] = data
        return files


def _ignored(name: str) -> bool:
    return any(part in _IGNORED_PARTS for part in PurePosixPath(name).parts)


def _read_folder(root: Path, limits: Limits) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    for entry in sorted(root.rglob("*")):
        rel = entry.relative_to(root).as_posix()
        if _ignored(rel):
            continue
        if entry.is_symlink():
            raise DatasetRejected(Problem(f"{rel} is a symbolic link: folders may hold only files"))
        if not entry.is_file():
            continue
        if len(files) >= limits.max_archive_files:
            raise DatasetRejected(
                Problem(f"{root.name} holds more than {limits.max_archive_files} files")
            )
        total += entry.stat().st_size
        if total > limits.max_archive_bytes:
            raise DatasetRejected(
                Problem(f"{root.name} holds more than the limit of {_mb(limits.max_archive_bytes)}")
            )
        files[rel] = entry.read_bytes()
    return files
