"""The runner on a real team's path: the database goes away mid-job, a lease is taken over after an
outage while the old attempt still runs, the runner is stopped with SIGTERM, a process dies. In
every case the job ends right (or waits in the queue) and nothing is failed, lost or done twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import col, select

from core.enums import JobStatus
from core.settings import Settings
from runner.datasets.ingest import IngestOptions, ingest_dataset
from runner.worker import Runner
from stack.processes import process_env
from storage.artifacts import ArtifactStore
from storage.db import make_engine, new_session
from storage.jobs import create_job, expire_leases, job_events
from storage.migrate import upgrade
from storage.models import Checkpoint, Dataset, Job, JobEvent
from storage.types import utcnow
from tests.conftest import REPO
from tests.db_proxy import DatabaseProxy
from tests.runner import dataset_files as files
from tests.runner.train_helpers import synthetic

LONG_JOB = {  # 1,200 steps of the tiny model over 48 samples: ~15 s on two idle cores
    "num_train_epochs": 50,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "logging_steps": 20,
    "save_steps": 200,
}


def _settings(db_url: str, tmp_path: Path, tiny_model_dir: Path, **extra) -> Settings:
    return Settings(
        _env_file=None,
        database_url=db_url,
        artifact_dir=tmp_path / "artifacts",
        base_model=str(tiny_model_dir),
        runner_lease_seconds=30.0,
        runner_poll_seconds=0.2,
        eval_backend="transformers",
        **extra,
    )


def _dataset(engine, settings: Settings, tmp_path: Path) -> int:
    rows = [(c[0].content.removeprefix("标题："), c[1].content) for c in synthetic(12)]
    path = files.write_json(tmp_path / "train.json", files.sharegpt(rows))
    with new_session(engine) as session:
        dataset, _ = ingest_dataset(
            session,
            ArtifactStore(settings.artifact_dir),
            path,
            IngestOptions.from_settings(settings),
            name="syn",
            tokenizer=None,
        )
    return dataset.id


def _job(engine, settings: Settings, dataset_id: int, **config) -> int:
    with new_session(engine) as session:
        return create_job(
            session, base_model=settings.base_model, dataset_id=dataset_id, config=config
        ).id


def _get(engine, job_id: int) -> Job:
    with new_session(engine) as session:
        return session.get(Job, job_id)


def _wait(predicate, timeout: float = 300.0, what: str = "it"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _kinds(engine, job_id: int) -> list[str]:
    with new_session(engine) as session:
        return [e.kind for e in job_events(session, job_id=job_id)]


@pytest.fixture
def proxied(postgres_url: str):
    upgrade(postgres_url)
    proxy = DatabaseProxy(postgres_url).start()
    yield proxy
    proxy.stop()


def test_a_database_outage_mid_job_keeps_it_training_and_it_succeeds(
    postgres_url, proxied, tmp_path, tiny_model_dir
) -> None:
    """The runner and its job process reach PostgreSQL through a proxy that drops every
    connection and refuses new ones for 8 s, as a restart does. Training goes on through it; its
    progress and checkpoints arrive once the database is back; the job succeeds on its first
    attempt."""
    direct = make_engine(postgres_url)  # the test's own view, not through the proxy
    settings = _settings(proxied.url, tmp_path, tiny_model_dir)
    dataset_id = _dataset(direct, settings, tmp_path)
    job_id = _job(direct, settings, dataset_id, **LONG_JOB)
    runner = Runner(settings, owner="runner-under-test", devices=[None])
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, kwargs={"stop": stop})
    thread.start()
    try:
        _wait(lambda: _get(direct, job_id).progress.get("step", 0) >= 100, what="training")
        cut_at_step = _get(direct, job_id).progress["step"]
        proxied.cut()
        cut_at = utcnow()
        time.sleep(8)
        restored_at = utcnow()
        proxied.restore()
        job = _wait(
            lambda: (
                (j := _get(direct, job_id)).status
                in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
                and j
            ),
            timeout=900,
            what="the job's end",
        )
    finally:
        stop.set()
        thread.join(60)
    assert job.status == JobStatus.succeeded, job.error
    assert job.attempts == 1
    kinds = _kinds(direct, job_id)
    assert "failed" not in kinds and "requeued" not in kinds
    with new_session(direct) as session:
        during = session.exec(
            select(JobEvent).where(
                JobEvent.job_id == job_id,
                col(JobEvent.created_at) > cut_at,
                col(JobEvent.created_at) < restored_at,
            )
        ).all()
        after = session.exec(
            select(JobEvent)
            .where(
                JobEvent.job_id == job_id,
                JobEvent.kind == "progress",
                col(JobEvent.created_at) >= restored_at,
            )
            .order_by(col(JobEvent.id))
        ).all()
        checkpoints = session.exec(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
    assert during == []  # the database really was away
    assert after and after[0].payload["step"] >= cut_at_step + 20  # it trained meanwhile
    steps = [c.step for c in checkpoints]
    assert steps == sorted(set(steps)) and steps[-1] == job.progress["total_steps"]
    assert len(steps) == job.progress["total_steps"] // LONG_JOB["save_steps"]
    direct.dispose()


def test_an_old_attempt_of_a_job_claimed_again_by_another_slot_changes_nothing(
    db_url, tmp_path, tiny_model_dir
) -> None:
    """A two-slot runner: its lease on a running job expires (an outage longer than the lease),
    the job is requeued and its other slot claims it. The first attempt must stop without
    writing, its slot must not fail the live attempt, and the job succeeds once."""
    upgrade(db_url)
    engine = make_engine(db_url)
    settings = _settings(db_url, tmp_path, tiny_model_dir)
    dataset_id = _dataset(engine, settings, tmp_path)
    job_id = _job(engine, settings, dataset_id, **{**LONG_JOB, "num_train_epochs": 25})
    runner = Runner(settings, owner="host:1", devices=[None, None])
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, kwargs={"stop": stop})
    thread.start()
    try:
        _wait(lambda: _get(engine, job_id).progress.get("step", 0) >= 40, what="training")
        first_token = _get(engine, job_id).lease_token
        with new_session(engine) as session:  # the lease ran out: expire it as a sweep would
            session.execute(
                update(Job)
                .where(col(Job.id) == job_id)
                .values(lease_expires_at=utcnow().replace(year=2000))
            )
            assert expire_leases(session, max_attempts=3) == [(job_id, "queued")]
        requeued_at = utcnow()
        job = _wait(
            lambda: (j := _get(engine, job_id)).status == JobStatus.succeeded and j,
            timeout=900,
            what="the second attempt to succeed",
        )
    finally:
        stop.set()
        thread.join(60)
    assert job.attempts == 2 and job.lease_token is None
    kinds = _kinds(engine, job_id)
    assert kinds.count("succeeded") == 1 and "failed" not in kinds
    with new_session(engine) as session:
        checkpoints = session.exec(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        late = [c for c in checkpoints if c.created_at > requeued_at and "attempt-1" in c.path]
    assert late == []  # the fenced attempt registered nothing after losing its claim
    assert first_token != job.lease_token
    assert (
        sorted({c.step for c in checkpoints if "attempt-2" in c.path})[-1]
        == (job.progress["total_steps"])
    )
    engine.dispose()


def test_a_late_heartbeat_never_makes_a_runner_requeue_its_own_live_job(
    tmp_path, tiny_model_dir
) -> None:
    """On two busy cores a heartbeat can wait on SQLite's write lock past a short lease. The
    runner's own sweep must not take that for a lost runner and requeue the job it is running
    (CI saw a job fail "its runner stopped answering 3 times" with one healthy runner); another
    runner's sweep still expires it, as it must when the host is really gone."""
    db_url = f"sqlite:///{tmp_path / 'late.db'}"
    upgrade(db_url)
    engine = make_engine(db_url)
    settings = _settings(db_url, tmp_path, tiny_model_dir)
    dataset_id = _dataset(engine, settings, tmp_path)
    job_id = _job(engine, settings, dataset_id, **LONG_JOB)
    runner = Runner(settings, owner="host:1", devices=[None])
    try:
        assert runner.poll() == 1
        _wait(lambda: _get(engine, job_id).status == JobStatus.running, what="the job to run")
        with new_session(engine) as session:  # its heartbeat is late: the lease ran out
            session.execute(
                update(Job)
                .where(col(Job.id) == job_id)
                .values(lease_expires_at=utcnow().replace(year=2000))
            )
            session.commit()
        runner.sweep()
        job = _get(engine, job_id)
        assert job.status == JobStatus.running and job.attempts == 1
        assert "requeued" not in _kinds(engine, job_id)
        Runner(settings, owner="host:2", devices=[]).sweep()  # a runner that does not run it
        assert _get(engine, job_id).status == JobStatus.queued
    finally:
        runner.shutdown(grace_seconds=30)
        engine.dispose()


def test_sigterm_to_the_runner_checkpoints_and_requeues_without_spending_an_attempt(
    tmp_path, tiny_model_dir
) -> None:
    """What `docker compose stop` does: SIGTERM to the runner. Its job saves a checkpoint at the
    step it reached and goes back to the queue with its attempt refunded; the next runner
    resumes from that step."""
    db_url = f"sqlite:///{tmp_path / 'test.db'}"
    upgrade(db_url)
    engine = make_engine(db_url)
    settings = _settings(db_url, tmp_path, tiny_model_dir)
    dataset_id = _dataset(engine, settings, tmp_path)
    job_id = _job(engine, settings, dataset_id, **{**LONG_JOB, "save_steps": 100_000})
    runner = subprocess.Popen(
        [sys.executable, "-m", "runner"],
        cwd=REPO,
        env={**process_env(settings), "RUNNER_POLL_SECONDS": "0.2"},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: _get(engine, job_id).progress.get("step", 0) >= 60, what="training")
        os.kill(runner.pid, signal.SIGTERM)
        assert runner.wait(60) == 0
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    job = _get(engine, job_id)
    assert job.status == JobStatus.queued and job.attempts == 0 and job.lease_token is None
    with new_session(engine) as session:
        [saved] = session.exec(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        events = job_events(session, job_id=job_id)
    assert not saved.final and saved.step >= 60
    assert [e.kind for e in events][-1] == "requeued"
    assert f"stopped at step {saved.step}" in events[-1].payload["reason"]

    Runner(settings, owner="next-runner", devices=[None]).run(once=True)
    job = _get(engine, job_id)
    assert job.status == JobStatus.succeeded, job.error
    assert job.attempts == 1
    with new_session(engine) as session:
        starts = [e.payload for e in job_events(session, job_id=job_id) if e.kind == "started"]
    assert [s["resumed_from_step"] for s in starts] == [None, saved.step]
    engine.dispose()


def test_a_killed_job_process_fails_the_job_saying_what_is_known(
    engine, db_url, tmp_path, tiny_model_dir
) -> None:
    settings = _settings(db_url, tmp_path, tiny_model_dir)
    dataset_id = _dataset(engine, settings, tmp_path)
    job_id = _job(engine, settings, dataset_id, **LONG_JOB)
    runner = Runner(settings, owner="host:2", devices=[None])
    runner.poll()
    try:
        _wait(lambda: _get(engine, job_id).progress.get("step", 0) >= 20, what="training")
        process = runner.slots[0].process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)  # what the kernel's OOM killer does
        process.join(30)
        runner.poll()
    finally:
        runner.shutdown()
    job = _get(engine, job_id)
    assert job.status == JobStatus.failed
    assert "killed (SIGKILL)" in job.error and "ran out of host memory" in job.error


def test_dataset_checks_run_in_their_own_slot_beside_training_one_at_a_time(
    engine, db_url, tmp_path, tiny_model_dir
) -> None:
    """An upload is not stuck behind an hour of training, and uploads never pile up in
    parallel: one dataset-check slot (RUNNER_INGEST_SLOTS=1) beside the device slot."""
    from core.enums import JobKind
    from tests.conftest import DEMO_DATASET

    settings = _settings(db_url, tmp_path, tiny_model_dir)
    dataset_id = _dataset(engine, settings, tmp_path)
    store = ArtifactStore(settings.artifact_dir)
    checks = []
    for i in range(2):
        with store.staged_dir(f"uploads/u{i}") as folder:
            (folder / "train.json").write_bytes((DEMO_DATASET / "train.json").read_bytes())
        with new_session(engine) as session:
            checks.append(
                create_job(
                    session,
                    kind=JobKind.ingest,
                    base_model=settings.base_model,
                    config={"upload": f"uploads/u{i}", "filename": "train.json", "name": "up"},
                ).id
            )
    training = _job(engine, settings, dataset_id, **LONG_JOB)
    runner = Runner(settings, owner="host:3", devices=[None])
    assert [s.name for s in runner.slots] == ["cpu", "dataset checks", "distillations"]
    try:
        assert runner.poll() == 2  # the training job on the CPU slot, one check on its slot
        running = {s.name: s.job_id for s in runner.slots}
        assert running == {"cpu": training, "dataset checks": checks[0], "distillations": None}
        assert _get(engine, checks[1]).status == JobStatus.queued
        _wait(
            lambda: runner.poll() >= 0 and _get(engine, checks[1]).status == JobStatus.succeeded,
            what="both checks",
        )
        assert _get(engine, training).status == JobStatus.running  # still training meanwhile
    finally:
        runner.shutdown()
    with new_session(engine) as session:
        versions = sorted(
            d.version for d in session.exec(select(Dataset).where(Dataset.name == "up")).all()
        )
    assert versions == [1, 2]
