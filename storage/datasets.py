"""Data access for datasets: keyword-only, verb-first, the session passed in."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from storage.models import Dataset


def next_dataset_version(session: Session, *, name: str) -> int:
    current = session.exec(select(func.max(Dataset.version)).where(Dataset.name == name)).one()
    return (current or 0) + 1


def create_dataset(session: Session, **fields: Any) -> Dataset:
    """Insert a dataset as the next version of its name. The caller commits."""
    dataset = Dataset(version=next_dataset_version(session, name=fields["name"]), **fields)
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, *, name: str, version: int | None = None) -> Dataset | None:
    query = select(Dataset).where(Dataset.name == name)
    if version is not None:
        query = query.where(Dataset.version == version)
    return session.exec(query.order_by(col(Dataset.version).desc())).first()


def latest_dataset(session: Session, *, channel_id: str | None = None) -> Dataset | None:
    query = select(Dataset)
    if channel_id is not None:
        query = query.where(Dataset.channel_id == channel_id)
    return session.exec(query.order_by(col(Dataset.id).desc())).first()


def list_datasets(session: Session, *, limit: int = 50) -> list[Dataset]:
    return list(session.exec(select(Dataset).order_by(col(Dataset.id).desc()).limit(limit)))
