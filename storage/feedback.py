"""Data access for feedback on ``/classify`` answers: keyword-only, verb-first, the session passed
in. A channel's feedback is its own: every query takes the channel."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.enums import FeedbackKind
from storage.models import Feedback
from storage.types import utcnow


def record_feedback(
    session: Session,
    *,
    kind: FeedbackKind,
    channel_id: str,
    message_ts: str,
    user_id: str,
    text: str,
    predicted_label: str,
    confidence: float | None,
    correct_label: str,
    checkpoint_id: int,
) -> Feedback:
    """Store a user's choice on one answer (``message_ts`` in ``channel_id``), or replace the
    choice the user made on it before: one row per user and answer. A changed choice counts as
    new (an export takes it again); the same choice again changes nothing. Commits."""
    for attempt in (1, 2):
        row = session.exec(
            select(Feedback).where(
                Feedback.channel_id == channel_id,
                Feedback.message_ts == message_ts,
                Feedback.user_id == user_id,
            )
        ).first()
        if row is not None and (row.kind, row.correct_label) == (kind.value, correct_label):
            return row
        chosen: dict[str, Any] = {
            "kind": kind.value,
            "text": text,
            "predicted_label": predicted_label,
            "confidence": confidence,
            "correct_label": correct_label,
            "checkpoint_id": checkpoint_id,
            "created_at": utcnow(),
            "exported_at": None,
            "dataset_id": None,
        }
        if row is None:
            row = Feedback(channel_id=channel_id, message_ts=message_ts, user_id=user_id, **chosen)
        else:
            row.sqlmodel_update(chosen)
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # the same user's other click inserted it first: replace that
            session.rollback()
            if attempt == 2:
                raise
            continue
        session.refresh(row)
        return row
    raise AssertionError("unreachable")


def channel_feedback(session: Session, *, channel_id: str) -> list[Feedback]:
    """The channel's feedback, oldest first."""
    return list(
        session.exec(
            select(Feedback).where(Feedback.channel_id == channel_id).order_by(col(Feedback.id))
        )
    )


def unexported_feedback(
    session: Session, *, channel_id: str, kinds: Sequence[FeedbackKind]
) -> list[Feedback]:
    """The channel's feedback of ``kinds`` that no export has taken yet, oldest first."""
    return list(
        session.exec(
            select(Feedback)
            .where(
                Feedback.channel_id == channel_id,
                col(Feedback.exported_at).is_(None),
                col(Feedback.kind).in_([k.value for k in kinds]),
            )
            .order_by(col(Feedback.id))
        )
    )


def mark_feedback_exported(
    session: Session, *, feedback_ids: Sequence[int], dataset_id: int, when: datetime | None = None
) -> None:
    """Point the rows at the dataset they went into. The caller commits (with the dataset)."""
    session.execute(
        update(Feedback)
        .where(col(Feedback.id).in_(list(feedback_ids)))
        .values(exported_at=when or utcnow(), dataset_id=dataset_id)
    )


def prune_feedback(session: Session, *, older_than: timedelta) -> int:
    """Delete feedback recorded more than ``older_than`` ago, exported or not (an exported
    dataset keeps its own copy); returns how many rows went. Commits."""
    gone = session.execute(
        delete(Feedback).where(col(Feedback.created_at) < utcnow() - older_than)
    ).rowcount  # type: ignore[attr-defined]
    session.commit()
    return int(gone or 0)
