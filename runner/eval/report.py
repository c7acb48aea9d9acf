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

from core.errors import BenchmarkRejected, ConfigError, NotFound
from core.protocol import PromptFrame
from core.settings import Settings
from runner.datasets.ingest import read_split
from runner.eval.benchmark import general_summary, read_benchmark, score_benchmark
from runner.eval.evaluate import evaluate_conversations
from runner.eval.metrics import deltas
from runner.eval.predict import make_predictor
from runner.models import load_tokenizer, model_dir_for
from storage.artifacts import ArtifactStore
from storage.datasets import get_dataset
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
    if dataset.kind == "pt":
        raise ConfigError(
            f"dataset {dataset.name} v{dataset.version} is raw text (stage=pt): it has no labels "
            "to score; a stage=pt job reports held-out perplexity in its thread"
        )
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
    benchmark, general_note = general_benchmark(session, settings)
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
        general_started = time.perf_counter()
        general = None
        if benchmark is not None:
            try:
                general = _score_general(
                    session,
                    store,
                    settings,
                    benchmark=benchmark,
                    base_model=base_model,
                    checkpoint=checkpoint,
                    tokenizer=tokenizer,
                    predictor=predictor,
                )
            except BenchmarkRejected as exc:  # the check cannot run: say so, keep the evaluation
                general_note = f"general ability was not scored on {benchmark.name}: {exc.message}"
                log.warning("%s", general_note)
        general_s = time.perf_counter() - general_started
    finally:
        del predictor
        gc.collect()
    metrics = outcome.metrics
    metrics["timings"] = {"load_s": round(load_s, 3), **metrics.get("timings", {})}
    if general is not None:
        metrics["general"] = general
        metrics["timings"]["general_s"] = round(general_s, 3)
    if general_note is not None:
        metrics["general_note"] = general_note
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


def general_benchmark(session: Session, settings: Settings) -> tuple[Dataset | None, str | None]:
    """The benchmark ``EVAL_GENERAL_BENCHMARK`` names (None when unset), or None and the reason
    it cannot be used, for the report."""
    name = settings.eval_general_benchmark
    if not name:
        return None, None
    found = get_dataset(session, name=name)
    if found is None or found.kind != "benchmark":
        note = (
            f"EVAL_GENERAL_BENCHMARK={name} names no benchmark dataset"
            + (f" ({name} is {found.kind} data)" if found is not None else "")
            + ": ingest one with `python -m runner ingest PATH --name NAME --benchmark`; "
            "general ability was not scored"
        )
        log.warning("%s", note)
        return None, note
    return found, None


def _score_general(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    *,
    benchmark: Dataset,
    base_model: str,
    checkpoint: Checkpoint | None,
    tokenizer: Any,
    predictor: Any,
) -> dict[str, Any]:
    """Score the general benchmark with ``predictor``, store it as the benchmark's evaluation
    row, and return the report's ``general`` entry (against the base's score)."""
    assert benchmark.id is not None
    scores = score_benchmark(
        read_benchmark(store, benchmark),
        tokenizer,
        predictor.read,
        max_prompt_tokens=settings.eval_max_model_len - 1,
    )
    add_evaluation(
        session,
        dataset_id=benchmark.id,
        base_model=base_model,
        checkpoint_id=checkpoint.id if checkpoint is not None else None,
        metrics=scores,
        report_path=None,
    )
    base = (
        latest_evaluation(
            session, dataset_id=benchmark.id, base_model=base_model, checkpoint_id=None
        )
        if checkpoint is not None
        else None
    )
    summary = general_summary(
        f"{benchmark.name} v{benchmark.version}",
        scores,
        base.metrics if base is not None else None,
        max_drop_pt=settings.eval_max_general_drop,
    )
    summary["subjects"] = {k: v["accuracy"] for k, v in scores["subjects"].items()}
    return summary


def ensure_base_evaluation(
    session: Session, store: ArtifactStore, settings: Settings, *, dataset: Dataset, base_model: str
) -> Evaluation:
    """The base model's evaluation on this eval set, computed once and cached; and its score on
    the general benchmark (``EVAL_GENERAL_BENCHMARK``), computed once per benchmark."""
    assert dataset.id is not None
    cached = latest_evaluation(
        session, dataset_id=dataset.id, base_model=base_model, checkpoint_id=None
    )
    if cached is not None:
        benchmark, _ = general_benchmark(session, settings)
        if benchmark is not None and benchmark.id is not None:
            scored = latest_evaluation(
                session, dataset_id=benchmark.id, base_model=base_model, checkpoint_id=None
            )
            if scored is None:  # the benchmark was named after the base's evaluation
                base_dir = model_dir_for(settings, base_model)
                assert base_dir is not None
                predictor = make_predictor(base_dir, None, settings)
                try:  # a benchmark this model cannot be scored on: the checkpoint's report says why
                    _score_general(
                        session,
                        store,
                        settings,
                        benchmark=benchmark,
                        base_model=base_model,
                        checkpoint=None,
                        tokenizer=load_tokenizer(base_dir),
                        predictor=predictor,
                    )
                except BenchmarkRejected as exc:
                    log.warning("general ability not scored for the base: %s", exc.message)
                finally:
                    del predictor
                    gc.collect()
        return cached
    return evaluate_model(
        session, store, settings, dataset=dataset, base_model=base_model, checkpoint=None
    )
