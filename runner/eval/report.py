"""Run an evaluation for storage: predictions, scores, deltas against the base model and the
promoted checkpoint, artifacts (``generated_predictions.jsonl``, ``eval.json``, ``confusion.png``,
``reliability.png``)
and the ``evaluations`` row."""

from __future__ import annotations

import gc
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from sqlmodel import Session

from core.errors import NotFound
from core.protocol import PromptFrame
from core.settings import Settings
from runner.datasets.ingest import read_split
from runner.eval.evaluate import evaluate_conversations
from runner.eval.metrics import deltas
from runner.eval.predict import make_predictor
from runner.models import load_tokenizer, model_dir_for
from storage.artifacts import ArtifactStore
from storage.evaluations import add_evaluation, latest_evaluation, promoted_checkpoint
from storage.models import Checkpoint, Dataset, Evaluation

log = logging.getLogger(__name__)


def evaluate_model(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    *,
    dataset: Dataset,
    base_model: str,
    checkpoint: Checkpoint | None,
    max_new_tokens: int | None = None,
) -> Evaluation:
    """Evaluate ``checkpoint`` (None: the base model) on ``dataset``'s eval split and store it."""
    if dataset.eval_sha256 is None:
        raise NotFound(f"dataset {dataset.name} v{dataset.version} has no eval split to score on")
    assert dataset.id is not None
    base_dir = model_dir_for(settings, base_model)
    assert base_dir is not None
    model_dir: Path = base_dir
    adapter_dir = store.path(checkpoint.path) if checkpoint is not None else None
    if checkpoint is not None and not checkpoint.meta.get("adapter", True):
        model_dir, adapter_dir = store.path(checkpoint.path), None  # freeze/full: whole models
    tokenizer = load_tokenizer(model_dir)
    conversations = read_split(store, dataset.eval_sha256)
    started = time.perf_counter()
    predictor = make_predictor(model_dir, adapter_dir, settings)
    load_s = time.perf_counter() - started
    try:
        outcome = evaluate_conversations(
            predictor,
            tokenizer,
            conversations,
            dataset.labels,
            max_model_len=settings.eval_max_model_len,
            max_new_tokens=max_new_tokens,
            frame=PromptFrame.from_dict(dataset.prompt_frame or {}),
        )
    finally:
        del predictor
        gc.collect()
    metrics = outcome.metrics
    metrics["timings"] = {"load_s": round(load_s, 3), **metrics.get("timings", {})}
    subject = f"checkpoint {checkpoint.id}" if checkpoint is not None else f"base {base_model}"
    if checkpoint is not None:
        base_eval = latest_evaluation(
            session, dataset_id=dataset.id, base_model=base_model, checkpoint_id=None
        )
        promoted = promoted_checkpoint(session)
        promoted_eval = (
            latest_evaluation(
                session, dataset_id=dataset.id, base_model=base_model, checkpoint_id=promoted.id
            )
            if promoted is not None and promoted.id != checkpoint.id
            else None
        )
        metrics["vs_base"] = deltas(metrics, base_eval.metrics if base_eval else None)
        metrics["vs_promoted"] = deltas(
            metrics,
            promoted_eval.metrics
            if promoted_eval
            else base_eval.metrics
            if promoted is None and base_eval
            else None,
        )
        metrics["promoted_checkpoint_id"] = promoted.id if promoted is not None else None
    relpath = (
        f"evals/dataset-{dataset.id}/"
        f"{'checkpoint-' + str(checkpoint.id) if checkpoint else 'base'}-"
        f"{uuid.uuid4().hex[:8]}"
    )
    report_started = time.perf_counter()
    with store.staged_dir(relpath) as directory:
        _write_report(directory, subject, dataset, metrics, outcome.predictions)
    metrics["timings"]["report_s"] = round(time.perf_counter() - report_started, 3)
    metrics["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    evaluation = add_evaluation(
        session,
        dataset_id=dataset.id,
        base_model=base_model,
        checkpoint_id=checkpoint.id if checkpoint else None,
        metrics=metrics,
        report_path=relpath,
    )
    log.info(
        "evaluated %s on %s: %s",
        subject,
        dataset.name,
        {k: metrics.get(k) for k in ("accuracy", "macro_f1", "predict_rouge-1")},
    )
    return evaluation


def _write_report(
    directory: Path,
    subject: str,
    dataset: Dataset,
    metrics: dict[str, Any],
    predictions: list[dict[str, Any]],
) -> None:
    with open(directory / "generated_predictions.jsonl", "w", encoding="utf-8") as out:
        for row in predictions:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    report = {
        "subject": subject,
        "dataset": {"id": dataset.id, "name": dataset.name, "version": dataset.version},
        **metrics,
    }
    (directory / "eval.json").write_text(
        json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    if "confusion" in metrics:
        from runner.plots import confusion_png

        confusion = metrics["confusion"]
        (directory / "confusion.png").write_bytes(
            confusion_png(
                confusion["labels"],
                confusion["columns"],
                confusion["matrix"],
                title=f"{subject} on {dataset.name}",
            )
        )
    if metrics.get("reliability"):
        from runner.plots import reliability_png

        (directory / "reliability.png").write_bytes(
            reliability_png(
                metrics["reliability"], ece=metrics["ece"], title=f"{subject} on {dataset.name}"
            )
        )


def ensure_base_evaluation(
    session: Session, store: ArtifactStore, settings: Settings, *, dataset: Dataset, base_model: str
) -> Evaluation:
    """The base model's evaluation on this eval set, computed once and cached."""
    assert dataset.id is not None
    cached = latest_evaluation(
        session, dataset_id=dataset.id, base_model=base_model, checkpoint_id=None
    )
    if cached is not None:
        return cached
    return evaluate_model(
        session, store, settings, dataset=dataset, base_model=base_model, checkpoint=None
    )
