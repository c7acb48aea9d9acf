"""The runner for real: child processes, leases, cancel, a killed runner's job resumed by another,
and failures that end a job with a message the user can act on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from sqlmodel import select

from core.enums import JobStatus
from core.settings import Settings
from runner.datasets.ingest import IngestOptions, ingest_dataset
from runner.job import run_job
from runner.worker import Runner
from stack.processes import process_env
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import claim_next_job, create_job, job_events, request_cancel
from storage.models import Checkpoint, Job
from tests.conftest import REPO
from tests.runner import dataset_files as files
from tests.runner.train_helpers import synthetic


@pytest.fixture
def runner_settings(settings: Settings, tiny_model_dir: Path) -> Settings:
    return settings.model_copy(
        update={
            "base_model": str(tiny_model_dir),
            "runner_lease_seconds": 30.0,
            "runner_poll_seconds": 0.2,
        }
    )


@pytest.fixture
def dataset_id(engine, runner_settings: Settings, tmp_path: Path) -> int:
    rows = [(c[0].content.removeprefix("标题："), c[1].content) for c in synthetic(8)]
    path = files.write_json(tmp_path / "train.json", files.sharegpt(rows))
    with new_session(engine) as session:
        dataset, _ = ingest_dataset(
            session,
            ArtifactStore(runner_settings.artifact_dir),
            path,
            IngestOptions.from_settings(runner_settings),
            name="syn",
            tokenizer=None,
        )
    return dataset.id


def _job(engine, settings: Settings, dataset_id: int, **config) -> int:
    with new_session(engine) as session:
        return create_job(
            session, base_model=settings.base_model, dataset_id=dataset_id, config=config
        ).id


def _wait(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def _get(engine, job_id: int) -> Job:
    with new_session(engine) as session:
        return session.get(Job, job_id)


def test_once_drains_the_queue_and_records_progress_and_checkpoints(
    engine,
    runner_settings,
    dataset_id,
) -> None:
    good = _job(
        engine,
        runner_settings,
        dataset_id,
        learning_rate=3e-3,
        num_train_epochs=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        save_steps=4,
        logging_steps=2,
    )
    qlora = _job(engine, runner_settings, dataset_id, method="qlora")
    Runner(runner_settings, owner="test-runner").run(once=True)

    job = _get(engine, good)
    assert job.status == JobStatus.succeeded, job.error
    assert job.progress["step"] == job.progress["total_steps"] == 8
    with new_session(engine) as session:
        kinds = [e.kind for e in job_events(session, job_id=good)]
        checkpoints = session.exec(select(Checkpoint).where(Checkpoint.job_id == good)).all()
        summary = job_events(session, job_id=good)[-1].payload
    assert kinds[:3] == ["queued", "claimed", "started"]
    assert kinds.count("progress") == 4 and kinds.count("checkpoint") == 2
    assert kinds[-1] == "succeeded"
    assert [(c.step, c.final) for c in checkpoints] == [(4, False), (8, True)]
    store = ArtifactStore(runner_settings.artifact_dir)
    final = store.path(checkpoints[-1].path)
    meta = json.loads((final / "meta.json").read_text())
    assert meta["protocol_version"] == 1 and meta["adapter"] is True
    assert sorted(meta["labels"]) == ["房产", "教育", "体育", "股票"] or len(meta["labels"]) == 4
    assert meta["prompt_frame"]["prefix"] == "请分类：\n标题："
    assert (final / "adapter_model.safetensors").exists()
    assert checkpoints[-1].meta == meta
    assert store.blob_path(summary["loss_curve_sha256"]).read_bytes()[:4] == b"\x89PNG"
    assert summary["tokens_per_s"] > 0

    failed = _get(engine, qlora)
    assert failed.status == JobStatus.failed
    assert "qlora needs a CUDA GPU" in failed.error


def test_cancel_stops_a_running_job_and_keeps_its_checkpoint(
    engine, runner_settings, dataset_id
) -> None:
    job_id = _job(
        engine,
        runner_settings,
        dataset_id,
        num_train_epochs=100,
        save_steps=1000,
        logging_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
    )
    runner = Runner(runner_settings, owner="test-runner")
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, kwargs={"stop": stop})
    thread.start()
    try:
        _wait(lambda: _get(engine, job_id).progress.get("step", 0) >= 3)
        with new_session(engine) as session:
            request_cancel(session, job_id=job_id, by="U1")
        asked = time.monotonic()
        job = _wait(lambda: (j := _get(engine, job_id)).status == JobStatus.cancelled and j, 30)
        assert time.monotonic() - asked < 10
        assert job.progress["step"] < job.progress["total_steps"]
        with new_session(engine) as session:
            checkpoint = session.exec(select(Checkpoint).where(Checkpoint.job_id == job_id)).one()
        assert checkpoint.step >= 3 and not checkpoint.final
    finally:
        stop.set()
        thread.join(60)


def test_a_killed_runners_job_is_resumed_by_another_runner(
    engine, runner_settings, dataset_id
) -> None:
    job_id = _job(
        engine,
        runner_settings,
        dataset_id,
        num_train_epochs=40,
        save_steps=5,
        logging_steps=5,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
    )
    env = {**process_env(runner_settings), "RUNNER_LEASE_SECONDS": "2"}
    first = subprocess.Popen(
        [sys.executable, "-m", "runner"],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def checkpointed() -> int | None:
            with new_session(engine) as session:
                found = session.exec(select(Checkpoint).where(Checkpoint.job_id == job_id)).first()
            return found.step if found else None

        _wait(checkpointed, 90)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the runner and its job's process, as a lost host
        first.wait()
    assert _get(engine, job_id).status == JobStatus.running  # nobody told the database
    from storage.types import utcnow

    _wait(lambda: _get(engine, job_id).lease_expires_at < utcnow(), 10)

    second = runner_settings.model_copy(update={"runner_lease_seconds": 2.0})
    Runner(second, owner="second-runner").run(once=True)

    job = _get(engine, job_id)
    assert job.status == JobStatus.succeeded, job.error
    assert job.attempts == 2 and job.progress["step"] == job.progress["total_steps"]
    with new_session(engine) as session:
        events = job_events(session, job_id=job_id)
    kinds = [e.kind for e in events]
    assert "requeued" in kinds
    starts = [e.payload for e in events if e.kind == "started"]
    assert starts[0]["resumed_from_step"] is None
    assert starts[-1]["resumed_from_step"] >= 5 and starts[-1]["owner"] == "second-runner"


def _run_in_process(engine, settings: Settings, job_id: int) -> Job:
    with new_session(engine) as session:
        token = claim_next_job(session, owner="inline", lease_seconds=60).lease_token
    run_job(job_id, token, settings)
    return _get(engine, job_id)


def test_a_missing_model_fails_the_job_with_a_message(
    engine, runner_settings, dataset_id, tmp_path
) -> None:
    with new_session(engine) as session:
        job_id = create_job(
            session, base_model=str(tmp_path / "gone" / "model"), dataset_id=dataset_id, config={}
        ).id
    job = _run_in_process(engine, runner_settings, job_id)
    assert job.status == JobStatus.failed
    assert "not found" in job.error and "gone/model" in job.error


def test_a_nan_loss_fails_the_job_with_a_hint(
    engine, runner_settings, dataset_id, tiny_model_dir, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "broken-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(broken)
    with new_session(engine) as session:
        job_id = create_job(session, base_model=str(broken), dataset_id=dataset_id, config={}).id
    job = _run_in_process(engine, runner_settings, job_id)
    assert job.status == JobStatus.failed
    assert "loss became nan at step 1" in job.error and "lower the learning rate" in job.error


def test_a_deleted_dataset_blob_fails_with_an_internal_error_id(
    engine, runner_settings, dataset_id
) -> None:
    store = ArtifactStore(runner_settings.artifact_dir)
    for path in store.files():
        path.unlink()
    job_id = _job(engine, runner_settings, dataset_id)
    job = _run_in_process(engine, runner_settings, job_id)
    assert job.status == JobStatus.failed and "internal error (error id" in job.error
