"""Data access for promotions: which checkpoint serves, and the audit trail of every switch.

The promotions table is the history, and the history is a stack: a promotion pushes what served
before it, a rollback pops back to what served before the current checkpoint was put in place
(``rollback to N`` pops down to N). ``replay_promotions`` and ``rollback_target`` are pure
functions over the rows; serving decides every rollback with them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import update
from sqlmodel import Session, col, select

from core.enums import CheckpointStatus, JobStatus
from core.errors import Conflict, NotFound
from storage.models import AuditLog, Checkpoint, Job, Promotion
from storage.types import utcnow

RollbackTo = int | Literal["base"] | None  # a checkpoint, the base model, or None: one step back


class AlreadyDecided(Conflict):
    """A decision on a checkpoint lost to another one (Reject after a promotion, a promotion of a
    checkpoint rejected meanwhile): the checkpoint's state and who decided it, for the message."""

    def __init__(self, checkpoint: Checkpoint, message: str) -> None:
        super().__init__(message)
        self.checkpoint_id = checkpoint.id
        self.status = checkpoint.status
        self.decided_by = checkpoint.decided_by


def serving_name(checkpoint_id: int | None) -> str:
    return f"checkpoint {checkpoint_id}" if checkpoint_id is not None else "the base model"


@dataclass(frozen=True)
class ServingHistory:
    """What serves now (None: the base model) and what served before it, oldest first."""

    current: int | None
    earlier: tuple[int | None, ...]


def replay_promotions(promotions: Iterable[Promotion]) -> ServingHistory:
    """The serving stack after ``promotions`` (oldest first).

    >>> def row(action, checkpoint_id):
    ...     return Promotion(action=action, checkpoint_id=checkpoint_id, decided_by="U1")
    >>> replay_promotions([row("promote", 1), row("promote", 2), row("promote", 3)])
    ServingHistory(current=3, earlier=(None, 1, 2))
    >>> replay_promotions([row("promote", 1), row("promote", 2), row("rollback", 1)])
    ServingHistory(current=1, earlier=(None,))

    A rollback to a checkpoint that is not on the stack (written before rollbacks walked back,
    when a second rollback served the first one's checkpoint again) counts as a promotion of it.
    """
    current: int | None = None
    earlier: list[int | None] = []
    for promotion in promotions:
        if promotion.action == "rollback" and promotion.checkpoint_id in earlier:
            while earlier.pop() != promotion.checkpoint_id:
                pass
        else:
            earlier.append(current)
        current = promotion.checkpoint_id
    return ServingHistory(current, tuple(earlier))


def rollback_target(history: ServingHistory, to: RollbackTo = None) -> int | None:
    """What a rollback serves: what served before the current checkpoint (``to`` None), or
    ``to`` (a checkpoint id, or ``"base"``) if it served before; Conflict otherwise.

    >>> history = ServingHistory(current=3, earlier=(None, 1, 2))
    >>> rollback_target(history), rollback_target(history, 1), rollback_target(history, "base")
    (2, 1, None)
    >>> rollback_target(history, 7)
    Traceback (most recent call last):
    ...
    core.errors.Conflict: checkpoint 7 did not serve before checkpoint 3: roll back to checkpoint 2, checkpoint 1 or the base model
    """
    now = serving_name(history.current)
    if not history.earlier:
        if history.current is None:
            raise Conflict(
                "nothing to roll back: the base model serves and nothing served before it"
            )
        raise Conflict(f"nothing to roll back: nothing served before {now}")
    if to is None:
        return history.earlier[-1]
    wanted = None if to == "base" else to
    if wanted == history.current:
        raise Conflict(f"{serving_name(wanted)} serves now: nothing to roll back to")
    if wanted not in history.earlier:
        choices = [serving_name(c) for c in dict.fromkeys(reversed(history.earlier))]
        listed = ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
        raise Conflict(f"{serving_name(wanted)} did not serve before {now}: roll back to {listed}")
    return wanted


def serving_history(session: Session) -> ServingHistory:
    """The serving stack as storage records it (every promotion, oldest first)."""
    return replay_promotions(session.exec(select(Promotion).order_by(col(Promotion.id))))


def record_promotion(
    session: Session,
    *,
    checkpoint_id: int | None,
    previous_checkpoint_id: int | None,
    action: str,
    decided_by: str,
) -> Promotion:
    """A new current promotion (checkpoint_id None: the base model serves), the checkpoints'
    states updated (the new one promoted, the old one retired) and an audit row, in one commit.

    Compare-and-set against Reject: the new checkpoint is promoted by ``UPDATE … WHERE status <>
    'rejected'``, so a checkpoint rejected at that moment (after serving validated it) is refused
    with AlreadyDecided and nothing is written."""
    now = utcnow()
    if checkpoint_id is not None:
        promoted = session.execute(
            update(Checkpoint)
            .where(
                col(Checkpoint.id) == checkpoint_id,
                col(Checkpoint.status) != CheckpointStatus.rejected.value,
            )
            .values(status=CheckpointStatus.promoted.value, decided_by=decided_by, decided_at=now)
        ).rowcount  # type: ignore[attr-defined]
        if not promoted:
            session.rollback()
            checkpoint = session.get(Checkpoint, checkpoint_id, populate_existing=True)
            if checkpoint is None:
                raise NotFound(f"no checkpoint {checkpoint_id}")
            by = f" by {checkpoint.decided_by}" if checkpoint.decided_by else ""
            raise AlreadyDecided(
                checkpoint, f"checkpoint {checkpoint_id} was rejected{by}; it was not promoted"
            )
    promotion = Promotion(
        checkpoint_id=checkpoint_id,
        previous_checkpoint_id=previous_checkpoint_id,
        action=action,
        decided_by=decided_by,
        created_at=now,
    )
    session.add(promotion)
    if previous_checkpoint_id is not None and previous_checkpoint_id != checkpoint_id:
        session.execute(
            update(Checkpoint)
            .where(col(Checkpoint.id) == previous_checkpoint_id)
            .values(status=CheckpointStatus.retired.value)
        )
    session.add(
        AuditLog(
            actor=decided_by,
            action=action,
            target=f"checkpoint:{checkpoint_id}" if checkpoint_id else "base",
            detail={"previous_checkpoint_id": previous_checkpoint_id},
        )
    )
    session.commit()
    return promotion


def promotion_history(session: Session, *, limit: int = 20) -> list[Promotion]:
    return list(session.exec(select(Promotion).order_by(col(Promotion.id).desc()).limit(limit)))


def reject_checkpoint(session: Session, *, checkpoint_id: int, decided_by: str) -> Checkpoint:
    """Mark a candidate checkpoint rejected (it can no longer be promoted), with an audit row.

    Compare-and-set: only ``candidate → rejected`` (``UPDATE … WHERE status = 'candidate'``); a
    checkpoint promoted (or rejected) meanwhile is refused with AlreadyDecided, unchanged."""
    rejected = session.execute(
        update(Checkpoint)
        .where(
            col(Checkpoint.id) == checkpoint_id,
            col(Checkpoint.status) == CheckpointStatus.candidate.value,
        )
        .values(status=CheckpointStatus.rejected.value, decided_by=decided_by, decided_at=utcnow())
    ).rowcount  # type: ignore[attr-defined]
    if not rejected:
        session.rollback()
        checkpoint = session.get(Checkpoint, checkpoint_id, populate_existing=True)
        if checkpoint is None:
            raise NotFound(f"no checkpoint {checkpoint_id}")
        by = f" by {checkpoint.decided_by}" if checkpoint.decided_by else ""
        raise AlreadyDecided(
            checkpoint,
            f"checkpoint {checkpoint_id} was already {checkpoint.status}{by}; it was not rejected",
        )
    session.add(AuditLog(actor=decided_by, action="reject", target=f"checkpoint:{checkpoint_id}"))
    session.commit()
    checkpoint = session.get(Checkpoint, checkpoint_id, populate_existing=True)
    assert checkpoint is not None
    return checkpoint


def list_checkpoints(
    session: Session, *, channel_id: str | None, limit: int = 15
) -> list[tuple[Checkpoint, Job]]:
    """The newest checkpoints of the channel's jobs (``channel_id`` None: of every job), each with
    its job."""
    query = select(Checkpoint, Job).join(Job, col(Job.id) == col(Checkpoint.job_id))
    if channel_id is not None:
        query = query.where(Job.channel_id == channel_id)
    rows = session.exec(query.order_by(col(Checkpoint.id).desc()).limit(limit))
    return [(checkpoint, job) for checkpoint, job in rows]


def promotion_problem(session: Session, *, checkpoint: Checkpoint) -> str | None:
    """Why ``checkpoint`` should not be promoted without ``force``: it was never evaluated, or
    it is an intermediate checkpoint of a job that failed or was cancelled; None when it may be.
    (A rejected checkpoint cannot be promoted at all: ``record_promotion`` refuses it.)"""
    from storage.evaluations import checkpoint_evaluation

    job = session.get(Job, checkpoint.job_id)
    name = f"checkpoint {checkpoint.id}"
    if job is None:
        return f"{name}'s job is gone"
    if job.status == JobStatus.failed:
        error = job.error or "no reason recorded"
        ended = "failed: " + (error if len(error) <= 300 else error[:299] + "…")
    elif job.status == JobStatus.cancelled:
        ended = "was cancelled"
    elif job.status == JobStatus.succeeded:
        ended = "succeeded"
    else:
        ended = f"is still {job.status}"
    assert checkpoint.id is not None
    if checkpoint.meta.get("stage") == "pt":
        return pt_promotion_refusal(checkpoint.id)
    if checkpoint_evaluation(session, checkpoint_id=checkpoint.id) is None:
        return f"{name} was never evaluated (its job {job.id} {ended})"
    if job.status in (JobStatus.failed, JobStatus.cancelled) and not checkpoint.final:
        return (
            f"{name} is an intermediate checkpoint (step {checkpoint.step}) of job {job.id}, "
            f"which {ended}"
        )
    return None


def pt_promotion_refusal(checkpoint_id: int) -> str:
    """Why a stage=pt checkpoint is never served (serving refuses it, forced or not)."""
    return (
        f"checkpoint {checkpoint_id} is continued pre-training (stage=pt), a base for SFT, "
        f"not a classifier: start an SFT job on it with base=checkpoint-{checkpoint_id}"
    )
