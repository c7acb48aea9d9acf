"""Show mistakes: an evaluation's misclassified eval samples, for a channel that may see them.

The evaluation's scores are the channel's (bot/scope.py): the evaluation of a checkpoint is seen
where its job is seen, and where an evaluate job of that checkpoint was started (its report lands
in that job's thread); the base model's by its dataset's channel. Another channel's evaluation is
"not found", like a missing one. The samples come from the evaluation's
``generated_predictions.jsonl`` (ARTIFACT_DIR/report_path); an evaluation from before labelled
predictions were written there says so instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, select

from bot.answer_blocks import has_labels, mistakes
from bot.scope import Scope
from core.enums import JobKind
from core.errors import Conflict, NotFound
from storage.artifacts import ArtifactStore
from storage.models import Checkpoint, Dataset, Evaluation, Job

PREDICTIONS = "generated_predictions.jsonl"


@dataclass(frozen=True)
class EvaluationMistakes:
    evaluation_id: int
    subject: str  # "checkpoint 7", or "the base model"
    wrong: list[dict[str, Any]]  # most confident first
    total: int  # eval samples scored


def find_evaluation(session: Session, scope: Scope, evaluation_id: int) -> Evaluation:
    """Evaluation ``evaluation_id`` if ``scope`` sees it; NotFound, as for a missing one, else."""
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None or not _sees(session, scope, evaluation):
        raise NotFound(f"no evaluation {evaluation_id} {scope.where}")
    return evaluation


def _sees(session: Session, scope: Scope, evaluation: Evaluation) -> bool:
    if evaluation.checkpoint_id is None:
        dataset = session.get(Dataset, evaluation.dataset_id)
        return dataset is not None and scope.sees(dataset.channel_id)
    checkpoint = session.get(Checkpoint, evaluation.checkpoint_id)
    job = session.get(Job, checkpoint.job_id) if checkpoint is not None else None
    if checkpoint is None or job is None:
        return False
    if scope.sees(job.channel_id):
        return True
    evaluate_jobs = session.exec(  # this channel's re-evaluations (an approver's `all`)
        select(Job).where(Job.kind == JobKind.evaluate.value, Job.channel_id == scope.channel)
    ).all()
    return any((j.config or {}).get("checkpoint_id") == checkpoint.id for j in evaluate_jobs)


def evaluation_mistakes(
    session: Session, store: ArtifactStore, scope: Scope, evaluation_id: int
) -> EvaluationMistakes:
    """The evaluation's mistakes, most confident first. NotFound when the scope does not see it;
    Conflict when it kept no labelled per-sample predictions (an older evaluation, or its files
    were removed)."""
    evaluation = find_evaluation(session, scope, evaluation_id)
    subject = (
        f"checkpoint {evaluation.checkpoint_id}"
        if evaluation.checkpoint_id is not None
        else "the base model"
    )
    rows = _read_rows(store, evaluation)
    if rows is None:
        raise Conflict(
            f"evaluation {evaluation_id} of {subject} kept no per-sample predictions on disk: "
            "nothing to list"
        )
    if not has_labels(rows):
        raise Conflict(
            f"evaluation {evaluation_id} of {subject} is older than per-sample labels: its "
            f"predictions have no reference and predicted label to compare. `/finetune evaluate "
            f"{evaluation.checkpoint_id}` scores it again with them"
            if evaluation.checkpoint_id is not None
            else f"evaluation {evaluation_id} of {subject} is older than per-sample labels"
        )
    return EvaluationMistakes(
        evaluation_id=evaluation_id, subject=subject, wrong=mistakes(rows), total=len(rows)
    )


def _read_rows(store: ArtifactStore, evaluation: Evaluation) -> list[dict[str, Any]] | None:
    if not evaluation.report_path:
        return None
    try:
        lines = (store.path(evaluation.report_path) / PREDICTIONS).read_text("utf-8").splitlines()
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a path escaping
        return None
    return [json.loads(line) for line in lines if line.strip()]
