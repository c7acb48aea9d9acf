"""On PostgreSQL a runner hears about a queued job at once (LISTEN/NOTIFY) instead of at its next
poll; polling stays the fallback."""

from __future__ import annotations

import threading
import time

from core.enums import JobStatus
from core.settings import Settings
from runner.worker import Runner
from storage.db import make_engine, new_session
from storage.jobs import create_job, job_events, set_job_thread
from storage.migrate import upgrade
from storage.models import Job


def _status(engine, job_id: int) -> str:
    with new_session(engine) as session:
        return session.get(Job, job_id).status


def _claimed_within(engine, job_id: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _status(engine, job_id) != JobStatus.queued:
            return True
        time.sleep(0.05)
    return False


def test_a_queued_job_wakes_a_runner_that_polls_only_every_minute(postgres_url, tmp_path):
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    settings = Settings(
        _env_file=None,
        database_url=postgres_url,
        artifact_dir=tmp_path / "artifacts",
        base_model=str(tmp_path / "no-model"),  # the job fails fast: only the claim matters
        runner_poll_seconds=60,
        runner_ingest_slots=0,
    )
    # Two slots: the Slack job's wake-up must not wait for the first job's process to end (its
    # imports alone take seconds on a loaded machine; CI saw that pass the 5 s window).
    runner = Runner(settings, owner="listener-test", devices=[None, None])
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, kwargs={"stop": stop})
    thread.start()
    try:
        time.sleep(2)  # its first poll (at start) is over: the next is a minute away
        with new_session(engine) as session:
            first = create_job(session, base_model=settings.base_model, config={}).id
        assert _claimed_within(engine, first, 5), "a new job did not wake the runner"
        with new_session(engine) as session:  # a Slack job becomes claimable with its thread
            slack = create_job(session, base_model=settings.base_model, config={}, channel_id="C1")
            time.sleep(1)
            assert _status(engine, slack.id) == JobStatus.queued  # no thread: not claimable
            set_job_thread(session, job=session.get(Job, slack.id), thread_ts="1700000000.1")
        assert _claimed_within(engine, slack.id, 5), "its thread did not wake the runner"
    finally:
        stop.set()
        thread.join(60)
        engine.dispose()
    check = make_engine(postgres_url)
    with new_session(check) as session:
        for job_id in (first, slack.id):
            claims = [e for e in job_events(session, job_id=job_id) if e.kind == "claimed"]
            assert len(claims) == 1  # claimed once, by the wake-up, not twice
    check.dispose()
