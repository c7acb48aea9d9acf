"""The evaluation scores what serving will answer: for a trained adapter (answers with a chain of
thought before the label), every eval prompt's predicted label and confidence in the evaluation's
``generated_predictions.jsonl`` equal what ``/v1/classify`` answers for its headline, with
reasoning and with ``reasoning=off`` — vLLM-CPU on both sides, as a team runs them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from core.enums import JobStatus
from runner.datasets.ingest import IngestOptions, ingest_dataset
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import job_events
from storage.models import Checkpoint
from tests.runner import dataset_files as files
from tests.runner.conftest import train_job
from tests.runner.train_helpers import KEYWORDS
from tests.serving.conftest import TOKEN, Deployment, promote, start, stop


@pytest.fixture
def db_url(tmp_path: Path) -> str:  # nothing here differs between databases: SQLite only
    return f"sqlite:///{tmp_path / 'test.db'}"


def _records(n_per_label: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for label, words in KEYWORDS.items():
        for _ in range(n_per_label):
            word = rng.choice(words)
            headline = f"{word}{rng.choice(['新闻', '消息', '报道', '动态'])}"
            answer = f"<think>\n标题说的是{word}，属于{label}。\n</think>\n\n{label}"
            out.append(
                {
                    "conversations": [
                        {"from": "human", "value": f"分类标题：{headline}"},
                        {"from": "gpt", "value": answer},
                    ]
                }
            )
    return out


def _classify(client: httpx.Client, text: str, reasoning: str) -> dict:
    response = client.post("/v1/classify", json={"text": text, "reasoning": reasoning})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
def test_evaluation_predicts_the_label_and_confidence_serving_answers(
    engine, settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = settings.model_copy(
        update={"base_model": str(tiny_model_dir), "eval_backend": "vllm"}
    )
    folder = tmp_path / "upload"
    folder.mkdir()
    files.write_json(folder / "train.json", _records(16, seed=0))
    files.write_json(folder / "eval.json", _records(3, seed=1))
    store = ArtifactStore(settings.artifact_dir)
    with new_session(engine) as session:
        dataset, _ = ingest_dataset(
            session,
            store,
            folder,
            IngestOptions.from_settings(settings),
            name="think",
            tokenizer=None,
        )
    job = train_job(engine, settings, dataset)
    assert job.status == JobStatus.succeeded, job.error
    with new_session(engine) as session:
        evaluated = next(
            e.payload for e in job_events(session, job_id=job.id) if e.kind == "evaluated"
        )
        final = session.exec(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.final)
        ).one()
    assert evaluated["backend"] == "vllm"
    report = store.path(evaluated["report_path"])
    rows = [
        json.loads(line)
        for line in (report / "generated_predictions.jsonl").read_text("utf-8").splitlines()
    ]
    metrics = json.loads((report / "eval.json").read_text("utf-8"))
    assert len(rows) == 12 and metrics["label_scoring"]["reasoning"] is True

    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": settings.db_url,
        "ARTIFACT_DIR": str(settings.artifact_dir),
        "BASE_MODEL": str(tiny_model_dir),
        "SERVING_API_KEY": TOKEN,
        # The same answer budget as the evaluation's, so a reasoning cut at it is cut alike.
        "SERVING_MAX_NEW_TOKENS": str(metrics["max_new_tokens"]),
        "SERVING_CPU_KV_CACHE_MIB": "128",
        "SERVING_SYNC_SECONDS": "0.5",
    }
    import os

    env = {**os.environ, **env}
    deployment = Deployment(tmp_path / "serving", env, {})
    deployment.root.mkdir()
    start(deployment)
    try:
        with deployment.client() as client:
            assert promote(client, final.id).status_code == 200
            for row in rows:
                on = _classify(client, row["text"], "on")
                assert on["kind"] == "label" and on["reasoning_mode"] == "on"
                assert on["label"] == row["prediction"], (row, on)
                assert abs(on["confidence"] - row["confidence"]) < 1e-3, (row, on)
                assert on["reasoning"] == row["reasoning"]
                assert on["reasoning_cut"] == row["reasoning_cut"]
                off = _classify(client, row["text"], "off")
                assert off["reasoning_mode"] == "off" and off["reasoning"] is None
                assert off["label"] == row["prediction_reasoning_off"], (row, off)
                assert abs(off["confidence"] - row["confidence_reasoning_off"]) < 1e-3
    finally:
        stop(deployment)
