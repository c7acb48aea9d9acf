"""Data access for datasets: keyword-only, verb-first, the session passed in.

Names are scoped. A dataset uploaded in a channel belongs to that channel: its versions count up
there alone, and another channel uploading the same name starts its own v1. A dataset without a
channel (``python -m runner ingest``, the demo's ``news-demo``) belongs to the deployment. In a
channel a name means, in this order: the channel's own dataset, one another channel marked
``shared``, the deployment's (``find_dataset``); ``visible_datasets`` lists the same set.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import false, func, or_, true, update
from sqlmodel import Session, col, select

from storage.models import Dataset


def _in_scope(channel_id: str | None) -> Any:
    """The WHERE clause of one scope: a channel's own datasets, or the deployment's (None)."""
    column = col(Dataset.channel_id)
    return column.is_(None) if channel_id is None else column == channel_id


def _visible_in(channel_id: str) -> Any:
    """What channel ``channel_id`` may use: its own, other channels' shared, the deployment's."""
    return or_(
        col(Dataset.channel_id) == channel_id,
        col(Dataset.shared) == true(),
        col(Dataset.channel_id).is_(None),
    )


def next_dataset_version(session: Session, *, name: str, channel_id: str | None = None) -> int:
    """The next version of ``name`` in the channel's scope (None: the deployment's)."""
    current = session.exec(
        select(func.max(Dataset.version)).where(Dataset.name == name, _in_scope(channel_id))
    ).one()
    return (current or 0) + 1


def create_dataset(session: Session, **fields: Any) -> Dataset:
    """Insert a dataset as the next version of its name in its channel (``channel_id``; none:
    the deployment's). A new version stays shared if the one before it was, unless ``shared``
    is given. The caller commits."""
    channel_id = fields.get("channel_id")
    if "shared" not in fields:
        before = find_own_dataset(session, name=fields["name"], channel_id=channel_id)
        fields["shared"] = bool(before is not None and before.shared)
    version = next_dataset_version(session, name=fields["name"], channel_id=channel_id)
    dataset = Dataset(version=version, **fields)
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, *, name: str, version: int | None = None) -> Dataset | None:
    """The operator's lookup, across every scope (the CLI has no channel): the deployment's
    dataset of that name if there is one, else the newest of any channel."""
    query = select(Dataset).where(Dataset.name == name)
    if version is not None:
        query = query.where(Dataset.version == version)
    deployment_first = col(Dataset.channel_id).is_not(None)  # False (the deployment's) sorts first
    return session.exec(
        query.order_by(deployment_first, col(Dataset.version).desc(), col(Dataset.id).desc())
    ).first()


def find_own_dataset(
    session: Session, *, name: str, channel_id: str | None, version: int | None = None
) -> Dataset | None:
    """``name`` (its newest version, or ``version``) in exactly one scope: the channel's own,
    or the deployment's when ``channel_id`` is None."""
    query = select(Dataset).where(Dataset.name == name, _in_scope(channel_id))
    if version is not None:
        query = query.where(Dataset.version == version)
    return session.exec(query.order_by(col(Dataset.version).desc())).first()


def find_dataset(
    session: Session, *, name: str, channel_id: str | None, version: int | None = None
) -> Dataset | None:
    """What ``name`` means in the channel: its own dataset, else one another channel shared
    (the newest such), else the deployment's. ``channel_id`` None: the deployment's only."""
    own = find_own_dataset(session, name=name, channel_id=channel_id, version=version)
    if own is not None or channel_id is None:
        return own
    query = select(Dataset).where(
        Dataset.name == name,
        col(Dataset.channel_id).is_not(None),
        col(Dataset.shared) == true(),
    )
    if version is not None:
        query = query.where(Dataset.version == version)
    shared = session.exec(query.order_by(col(Dataset.id).desc())).first()
    if shared is not None:
        return shared
    return find_own_dataset(session, name=name, channel_id=None, version=version)


def is_dataset_visible(dataset: Dataset, *, channel_id: str) -> bool:
    """Whether channel ``channel_id`` may train on ``dataset`` (its own, shared, the
    deployment's)."""
    return dataset.channel_id in (channel_id, None) or dataset.shared


def latest_dataset(session: Session, *, channel_id: str | None = None) -> Dataset | None:
    """The newest dataset uploaded in the channel (None: the newest of any scope)."""
    query = select(Dataset)
    if channel_id is not None:
        query = query.where(Dataset.channel_id == channel_id)
    return session.exec(query.order_by(col(Dataset.id).desc())).first()


def visible_datasets(session: Session, *, channel_id: str, limit: int = 50) -> list[Dataset]:
    """What the channel may use, newest first: its own, other channels' shared, the
    deployment's."""
    query = select(Dataset).where(_visible_in(channel_id))
    return list(session.exec(query.order_by(col(Dataset.id).desc()).limit(limit)))


def list_datasets(session: Session, *, limit: int = 50) -> list[Dataset]:
    """Every channel's datasets and the deployment's, newest first (for approvers)."""
    return list(session.exec(select(Dataset).order_by(col(Dataset.id).desc()).limit(limit)))


def set_dataset_shared(session: Session, *, name: str, channel_id: str, shared: bool) -> int:
    """Mark every version of the channel's own ``name`` shared (or not); later uploads of the
    name follow. Returns how many versions changed; commits."""
    changed = session.execute(
        update(Dataset)
        .where(
            col(Dataset.name) == name,
            col(Dataset.channel_id) == channel_id,
            col(Dataset.shared) == (false() if shared else true()),
        )
        .values(shared=shared)
    ).rowcount  # type: ignore[attr-defined]
    session.commit()
    return int(changed or 0)


def mix_dataset(session: Session, *, name: str, channel_id: str | None) -> Dataset:
    """The dataset ``mix=NAME:SHARE`` names for a job of ``channel_id`` (None: the operator's, any
    scope): training data the channel may use; NotFound or ConfigError saying why not."""
    from core.errors import ConfigError, NotFound

    found = (
        find_dataset(session, name=name, channel_id=channel_id)
        if channel_id is not None
        else get_dataset(session, name=name)
    )
    if found is None:
        raise NotFound(
            f"mix: no dataset named {name} that this channel may use (its own, one shared by "
            "another channel, or the deployment's: `/finetune datasets`)"
        )
    if found.kind != "sft":
        what = (
            "raw text (stage=pt), not conversations"
            if found.kind == "pt"
            else f"a {found.kind} dataset, not training data"
        )
        raise ConfigError(f"mix: dataset {name} is {what}; name one to mix in")
    return found


def stage_problem(dataset: Dataset, stage: str) -> str | None:
    """Why a ``stage`` job cannot train on ``dataset`` (raw text is for stage=pt, conversations
    for stage=sft); None when it can. Benchmarks are refused by the job itself."""
    name = f"dataset {dataset.name} v{dataset.version}"
    if stage == "pt" and dataset.kind == "sft":
        return (
            f"{name} holds conversations (SFT data) and stage=pt trains on raw text: upload a .txt "
            'file, {"text": …} records or a dataset_info.json entry with columns {"prompt": '
            '"text"}, or drop stage=pt to fine-tune on it'
        )
    if stage != "pt" and dataset.kind == "pt":
        return (
            f"{name} is raw text (documents, no answers to learn): train on it with stage=pt, "
            "or name a conversation dataset for stage=sft"
        )
    return None
