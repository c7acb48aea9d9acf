"""Data access for evaluations and the promotion that currently serves."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from storage.models import Checkpoint, Dataset, Evaluation, Promotion


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


def on_eval_sets(query: Any) -> Any:
    """Only evaluations on a dataset's eval split: a general benchmark's scores
    (``Dataset.kind == "benchmark"``, runner/eval/benchmark.py) are not a checkpoint's evaluation."""
    return query.join(Dataset, col(Dataset.id) == col(Evaluation.dataset_id)).where(
        Dataset.kind != "benchmark"
    )


def checkpoint_evaluation(session: Session, *, checkpoint_id: int) -> Evaluation | None:
    """The newest evaluation of a checkpoint, on any eval set (not a general benchmark's)."""
    return session.exec(
        on_eval_sets(select(Evaluation))
        .where(Evaluation.checkpoint_id == checkpoint_id)
        .order_by(col(Evaluation.id).desc())
    ).first()


def checkpoint_evaluations(session: Session, *, checkpoint_ids: list[int]) -> dict[int, Evaluation]:
    """The newest evaluation of each of ``checkpoint_ids`` that has one, by checkpoint id."""
    found: dict[int, Evaluation] = {}
    if not checkpoint_ids:
        return found
    rows = session.exec(
        on_eval_sets(select(Evaluation))
        .where(col(Evaluation.checkpoint_id).in_(checkpoint_ids))
        .order_by(col(Evaluation.id))
    )
    for evaluation in rows:
        assert evaluation.checkpoint_id is not None
        found[evaluation.checkpoint_id] = evaluation  # the newest comes last
    return found
