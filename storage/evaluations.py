"""Data access for evaluations and the promotion that currently serves."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from storage.models import Checkpoint, Evaluation, Promotion


def add_evaluation(
    session: Session,
    *,
    dataset_id: int,
    base_model: str,
    checkpoint_id: int | None,
    metrics: dict[str, Any],
    report_path: str | None,
) -> Evaluation:
    evaluation = Evaluation(
        dataset_id=dataset_id,
        base_model=base_model,
        checkpoint_id=checkpoint_id,
        metrics=metrics,
        report_path=report_path,
    )
    session.add(evaluation)
    session.commit()
    return evaluation


def latest_evaluation(
    session: Session, *, dataset_id: int, base_model: str, checkpoint_id: int | None
) -> Evaluation | None:
    """The newest evaluation of a checkpoint (or of the base model when checkpoint_id is None)
    on a dataset."""
    query = select(Evaluation).where(
        Evaluation.dataset_id == dataset_id, Evaluation.base_model == base_model
    )
    query = query.where(
        col(Evaluation.checkpoint_id).is_(None)
        if checkpoint_id is None
        else Evaluation.checkpoint_id == checkpoint_id
    )
    return session.exec(query.order_by(col(Evaluation.id).desc())).first()


def current_promotion(session: Session) -> Promotion | None:
    return session.exec(select(Promotion).order_by(col(Promotion.id).desc())).first()


def promoted_checkpoint(session: Session) -> Checkpoint | None:
    promotion = current_promotion(session)
    if promotion is None or promotion.checkpoint_id is None:
        return None
    return session.get(Checkpoint, promotion.checkpoint_id)
