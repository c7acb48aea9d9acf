"""The queue on SQLite and PostgreSQL: atomic claims, leases, expiry, cancel."""

from __future__ import annotations

import threading
import time

import pytest
from sqlmodel import select

from core.enums import JobStatus
from core.errors import Conflict, NotFound
from storage.db import make_engine, new_session
from storage.jobs import (
    claim_next_job,
    create_job,
    expire_leases,
    job_events,
    record_progress,
    renew_lease,
    request_cancel,
    set_job_state,
)
from storage.models import Job


def _jobs(engine, n: int) -> list[int]:
    with new_session(engine) as session:
        return [create_job(session, base_model="tiny", config={"i": i}).id for i in range(n)]


def test_claims_the_oldest_queued_job_and_leases_it(engine) -> None:
    first, second = _jobs(engine, 2)
    with new_session(engine) as session:
        job = claim_next_job(session, owner="A", lease_seconds=60)
        assert job.id == first and job.status == JobStatus.running
        assert job.lease_owner == "A" and job.attempts == 1 and job.lease_expires_at is not None
        assert claim_next_job(session, owner="B", lease_seconds=60).id == second
        assert claim_next_job(session, owner="C", lease_seconds=60) is None
        assert [e.kind for e in job_events(session, job_id=first)] == ["queued", "claimed"]


def test_concurrent_runners_never_claim_the_same_job(db_url, engine) -> None:
    ids = _jobs(engine, 40)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def runner(name: str) -> None:
        own_engine = make_engine(db_url)  # its own connections, as another host would have
        try:
            mine = claimed.setdefault(name, [])
            with new_session(own_engine) as session:
                while (job := claim_next_job(session, owner=name, lease_seconds=60)) is not None:
                    mine.append(job.id)
        except BaseException as exc:
            errors.append(exc)
        finally:
            own_engine.dispose()

    threads = [threading.Thread(target=runner, args=(f"runner-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    everything = [job_id for jobs in claimed.values() for job_id in jobs]
    assert sorted(everything) == sorted(ids)  # each job exactly once
    with new_session(engine) as session:
        owners = {j.id: j.lease_owner for j in session.exec(select(Job)).all()}
    for name, jobs in claimed.items():
        assert all(owners[job_id] == name for job_id in jobs)


def test_only_the_lease_holder_can_renew_or_change_a_job(engine) -> None:
    (job_id,) = _jobs(engine, 1)
    with new_session(engine) as session:
        claim_next_job(session, owner="A", lease_seconds=60)
        assert renew_lease(session, job_id=job_id, owner="A", lease_seconds=60)
        assert not renew_lease(session, job_id=job_id, owner="B", lease_seconds=60)
        assert not set_job_state(session, job_id=job_id, owner="B", status=JobStatus.failed)
        assert not record_progress(session, job_id=job_id, owner="B", progress={"step": 1})
        assert record_progress(session, job_id=job_id, owner="A", progress={"step": 1})
        assert set_job_state(session, job_id=job_id, owner="A", status=JobStatus.succeeded)
        job = session.get(Job, job_id, populate_existing=True)
        assert job.status == JobStatus.succeeded and job.lease_owner is None
        assert job.finished_at is not None and job.progress == {"step": 1}


def test_expired_leases_are_requeued_then_failed_after_the_retry_limit(engine) -> None:
    (job_id,) = _jobs(engine, 1)
    with new_session(engine) as session:
        for attempt in (1, 2):
            job = claim_next_job(session, owner=f"host-{attempt}", lease_seconds=0.05)
            assert job.id == job_id and job.attempts == attempt
            time.sleep(0.1)
            assert expire_leases(session, max_attempts=2) == (
                [(job_id, "queued")] if attempt == 1 else [(job_id, "failed")]
            )
        job = session.get(Job, job_id, populate_existing=True)
        assert job.status == JobStatus.failed
        assert "stopped answering 2 times (last: host-2)" in job.error
        kinds = [e.kind for e in job_events(session, job_id=job_id)]
        assert kinds == ["queued", "claimed", "requeued", "claimed", "failed"]


def test_a_live_lease_is_not_expired(engine) -> None:
    _jobs(engine, 1)
    with new_session(engine) as session:
        claim_next_job(session, owner="A", lease_seconds=60)
        assert expire_leases(session, max_attempts=3) == []


def test_cancel_a_queued_job_at_once_and_flag_a_running_one(engine) -> None:
    queued, running = _jobs(engine, 2)
    with new_session(engine) as session:
        claim_next_job(session, owner="A", lease_seconds=60)  # takes `queued` (the oldest)
    with new_session(engine) as session:
        flagged = request_cancel(session, job_id=queued, by="U1")
        assert flagged.status == JobStatus.running and flagged.cancel_requested
        assert not record_progress(session, job_id=queued, owner="A", progress={"step": 2})
        cancelled = request_cancel(session, job_id=running, by="U1")
        assert cancelled.status == JobStatus.cancelled and cancelled.finished_at is not None
        with pytest.raises(Conflict, match="already ended"):
            request_cancel(session, job_id=running)
        with pytest.raises(NotFound):
            request_cancel(session, job_id=999_999)
