"""Data access for promotions: which checkpoint serves, and the audit trail of every switch."""

from __future__ import annotations

from sqlmodel import Session, col, select

from core.enums import CheckpointStatus
from storage.models import AuditLog, Checkpoint, Promotion
from storage.types import utcnow


def record_promotion(
    session: Session,
    *,
    checkpoint_id: int | None,
    previous_checkpoint_id: int | None,
    action: str,
    decided_by: str,
) -> Promotion:
    """A new current promotion (checkpoint_id None: the base model serves), the checkpoints'
    states updated (the new one promoted, the old one retired) and an audit row, in one commit."""
    now = utcnow()
    promotion = Promotion(
        checkpoint_id=checkpoint_id,
        previous_checkpoint_id=previous_checkpoint_id,
        action=action,
        decided_by=decided_by,
        created_at=now,
    )
    session.add(promotion)
    if previous_checkpoint_id is not None and previous_checkpoint_id != checkpoint_id:
        previous = session.get(Checkpoint, previous_checkpoint_id)
        if previous is not None:
            previous.status = CheckpointStatus.retired.value
            session.add(previous)
    if checkpoint_id is not None:
        current = session.get(Checkpoint, checkpoint_id)
        if current is not None:
            current.status = CheckpointStatus.promoted.value
            current.decided_by, current.decided_at = decided_by, now
            session.add(current)
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
    """Mark a candidate checkpoint rejected (it can no longer be promoted), with an audit row."""
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        from core.errors import NotFound

        raise NotFound(f"no checkpoint {checkpoint_id}")
    checkpoint.status = CheckpointStatus.rejected.value
    checkpoint.decided_by, checkpoint.decided_at = decided_by, utcnow()
    session.add(checkpoint)
    session.add(AuditLog(actor=decided_by, action="reject", target=f"checkpoint:{checkpoint_id}"))
    session.commit()
    return checkpoint
