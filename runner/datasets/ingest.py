"""Validate and ingest an upload. Validation writes nothing; ingestion writes the normalised splits
as content-addressed blobs and one ``datasets`` row, or nothing at all."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session

from core.enums import Split
from core.errors import ConfigError, DatasetRejected, Problem
from core.protocol import ChatTokenizer, Message
from core.settings import Settings
from runner.datasets.layout import Loaded, load_splits
from runner.datasets.report import build_report
from runner.datasets.sources import Limits, read_upload
from storage.artifacts import ArtifactStore
from storage.datasets import create_dataset
from storage.models import Dataset

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^\w[\w.-]{0,63}$")


@dataclass(frozen=True)
class IngestOptions:
    limits: Limits
    cutoff_len: int
    text_column: str | None = None
    label_column: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> IngestOptions:
        limits = Limits(
            settings.max_upload_bytes, settings.max_archive_bytes, settings.max_archive_files
        )
        values: dict[str, Any] = {"limits": limits, "cutoff_len": settings.cutoff_len}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def load_dataset(path: Path, options: IngestOptions) -> Loaded:
    files = read_upload(path, options.limits)
    loaded = load_splits(files, text_column=options.text_column, label_column=options.label_column)
    if not (loaded.documents if loaded.kind == "pt" else loaded.splits).get(Split.train):
        what = "documents" if loaded.kind == "pt" else "samples"
        raise DatasetRejected(Problem(f"the dataset is empty: no train {what}"))
    return loaded


def validate_dataset(
    path: Path,
    options: IngestOptions,
    *,
    tokenizer: ChatTokenizer | None,
    tokenizer_note: str | None = None,
) -> dict[str, Any]:
    """The report for ``path``; raises DatasetRejected. Writes nothing."""
    loaded = load_dataset(path, options)
    return build_report(
        loaded, tokenizer=tokenizer, cutoff_len=options.cutoff_len, tokenizer_note=tokenizer_note
    )


def check_dataset_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ConfigError(
            f"dataset name {name!r} is not allowed: use 1–64 letters, digits, "
            "'_', '-' or '.', starting with a letter or digit"
        )
    return name


def serialise_split(conversations: list[list[Message]]) -> bytes:
    lines = (
        json.dumps(
            {"messages": [m.to_dict() for m in c]}, ensure_ascii=False, separators=(",", ":")
        )
        for c in conversations
    )
    return ("\n".join(lines) + "\n").encode()


def read_split(store: ArtifactStore, sha256: str) -> list[list[Message]]:
    """Conversations of a stored split (the inverse of ``serialise_split``)."""
    return [
        [Message(m["role"], m["content"]) for m in json.loads(line)["messages"]]
        for line in store.read_bytes(sha256).decode().splitlines()
        if line
    ]


def serialise_documents(documents: list[str]) -> bytes:
    """A raw-text split as JSON Lines of ``{"text": …}``."""
    lines = (json.dumps({"text": d}, ensure_ascii=False) for d in documents)
    return ("\n".join(lines) + "\n").encode()


def read_documents(store: ArtifactStore, sha256: str) -> list[str]:
    """Documents of a stored raw-text split (the inverse of ``serialise_documents``)."""
    return [
        json.loads(line)["text"] for line in store.read_bytes(sha256).decode().splitlines() if line
    ]


def _split_blobs(loaded: Loaded) -> dict[Split, bytes]:
    if loaded.kind == "pt":
        return {s: serialise_documents(d) for s, d in loaded.documents.items() if d}
    return {s: serialise_split(c) for s, c in loaded.splits.items() if c}


def ingest_dataset(
    session: Session,
    store: ArtifactStore,
    path: Path,
    options: IngestOptions,
    *,
    name: str,
    tokenizer: ChatTokenizer | None,
    tokenizer_note: str | None = None,
    channel_id: str | None = None,
    uploaded_by: str | None = None,
    commit: bool = True,
) -> tuple[Dataset, dict[str, Any]]:
    """Validate, then store the splits and the row together; on any failure remove what this
    call wrote and leave the database unchanged. ``commit=False``: the row is flushed, and the
    caller commits it with its own writes (a dataset check records its end in the same
    transaction)."""
    check_dataset_name(name)
    loaded = load_dataset(path, options)
    report = build_report(
        loaded, tokenizer=tokenizer, cutoff_len=options.cutoff_len, tokenizer_note=tokenizer_note
    )
    written: list[str] = []
    try:
        blobs: dict[Split, str] = {}
        for split, data in _split_blobs(loaded).items():
            blob = store.put_bytes(data)
            if blob.created:
                written.append(blob.sha256)
            blobs[split] = blob.sha256
        dataset = create_dataset(
            session,
            name=name,
            source_name=path.name,
            format=loaded.format,
            train_sha256=blobs[Split.train],
            eval_sha256=blobs.get(Split.eval),
            kind=loaded.kind,
            train_samples=report["samples"][Split.train.value],
            eval_samples=report["samples"].get(Split.eval.value, 0),
            labels=report["labels"],
            prompt_frame=report["prompt_frame"],
            report=report,
            channel_id=channel_id,
            uploaded_by=uploaded_by,
        )
        if commit:
            session.commit()
    except BaseException:
        session.rollback()
        for sha256 in written:
            store.delete_blob(sha256)
        raise
    log.info(
        "ingested dataset %s v%d (%d train, %d eval)",
        dataset.name,
        dataset.version,
        dataset.train_samples,
        dataset.eval_samples,
    )
    return dataset, report
