"""Evaluation on the tiny model: after training, on demand, through vLLM and transformers."""

from __future__ import annotations

import json

from sqlmodel import select

from core.enums import JobStatus
from runner.eval.report import evaluate_model
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import job_events
from storage.models import Checkpoint, Evaluation, Promotion
from tests.runner.conftest import train_job as _train


def test_a_job_evaluates_its_final_checkpoint_and_the_base_model_once(
    engine,
    eval_settings,
    dataset,
) -> None:
    first = _train(engine, eval_settings, dataset)
    assert first.status == JobStatus.succeeded, first.error
    with new_session(engine) as session:
        events = job_events(session, job_id=first.id)
        evaluations = session.exec(select(Evaluation)).all()
        final = session.exec(
            select(Checkpoint).where(Checkpoint.job_id == first.id, Checkpoint.final)
        ).one()
    kinds = [e.kind for e in events]
    assert kinds[-3:] == ["trained", "evaluated", "succeeded"]
    evaluated = next(e.payload for e in events if e.kind == "evaluated")
    assert evaluated["checkpoint_id"] == final.id
    assert evaluated["accuracy"] >= 0.9 and evaluated["macro_f1"] >= 0.9
    assert evaluated["vs_base"]["accuracy"] == round(
        evaluated["accuracy"]
        - next(e for e in evaluations if e.checkpoint_id is None).metrics["accuracy"],
        4,
    )
    assert sorted(e.checkpoint_id is None for e in evaluations) == [False, True]

    store = ArtifactStore(eval_settings.artifact_dir)
    report = store.path(evaluated["report_path"])
    rows = [
        json.loads(line)
        for line in (report / "generated_predictions.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()
    ]
    assert len(rows) == 20 and set(rows[0]) >= {"prompt", "predict", "label", "text"}
    labels = set(dataset.labels)
    for row in rows:  # every headline answer is a label from the set, with its distribution
        assert row["prediction"] in labels and row["reference"] in labels
        assert row["correct"] == (row["prediction"] == row["reference"])
        assert set(row["scores"]) == labels and abs(sum(row["scores"].values()) - 1) < 1e-4
        assert row["confidence"] == max(row["scores"].values()) == row["scores"][row["prediction"]]
    assert evaluated["accuracy"] == round(sum(r["correct"] for r in rows) / 20, 4)
    assert 0 <= evaluated["ece"] <= 1
    reasoning = any("</think>" in r["label"] for r in rows)  # reasoning-off only when it has some
    assert (evaluated["accuracy_reasoning_off"] is not None) == reasoning
    assert all(("prediction_reasoning_off" in r) == reasoning for r in rows)
    assert rows[0]["prompt"].endswith("<｜Assistant｜>")
    saved = json.loads((report / "eval.json").read_text(encoding="utf-8"))
    assert saved["accuracy"] == evaluated["accuracy"] and saved["backend"] == "transformers"
    assert sum(map(sum, saved["confusion"]["matrix"])) == 20
    assert (report / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (report / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert sum(b["count"] for b in saved["reliability"]) == 20

    with new_session(engine) as session:  # the first job's checkpoint now serves
        session.add(Promotion(checkpoint_id=final.id, action="promote", decided_by="U1"))
        session.commit()
    second = _train(engine, eval_settings, dataset)
    assert second.status == JobStatus.succeeded
    with new_session(engine) as session:
        later = next(
            e.payload for e in job_events(session, job_id=second.id) if e.kind == "evaluated"
        )
        first_metrics = session.get(Evaluation, evaluated["evaluation_id"]).metrics
        second_metrics = session.get(Evaluation, later["evaluation_id"]).metrics
    assert second_metrics["promoted_checkpoint_id"] == final.id
    assert later["vs_promoted"] == {
        key: round(second_metrics[key] - first_metrics[key], 4) for key in later["vs_promoted"]
    }
    assert set(later["vs_promoted"]) >= {"accuracy", "macro_f1", "predict_rouge-1"}
    with new_session(engine) as session:
        bases = session.exec(select(Evaluation).where(Evaluation.checkpoint_id.is_(None))).all()
    assert len(bases) == 1  # cached per (base model, eval set)


def test_a_truncated_generation_is_counted_as_such(engine, eval_settings, dataset) -> None:
    with new_session(engine) as session:
        evaluation = evaluate_model(
            session,
            ArtifactStore(eval_settings.artifact_dir),
            eval_settings,
            dataset=dataset,
            base_model=eval_settings.base_model,
            checkpoint=None,
            max_new_tokens=1,
        )
    assert evaluation.metrics["max_new_tokens"] == 1
    assert evaluation.metrics["truncated_rate"] == 1.0
