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
    add_checkpoint,
    claim_next_job,
    create_job,
    expire_leases,
    job_events,
    prune_history,
    record_progress,
    renew_lease,
    request_cancel,
    requeue_job,
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


def test_only_the_current_claim_can_renew_or_change_a_job(engine) -> None:
    (job_id,) = _jobs(engine, 1)
    with new_session(engine) as session:
        token = claim_next_job(session, owner="A", lease_seconds=60).lease_token
        assert token
        assert renew_lease(session, job_id=job_id, token=token, lease_seconds=60)
        assert not renew_lease(session, job_id=job_id, token="other", lease_seconds=60)
        assert not set_job_state(session, job_id=job_id, token="other", status=JobStatus.failed)
        assert not record_progress(session, job_id=job_id, token="other", progress={"step": 1})
        assert record_progress(session, job_id=job_id, token=token, progress={"step": 1})
        assert set_job_state(session, job_id=job_id, token=token, status=JobStatus.succeeded)
        job = session.get(Job, job_id, populate_existing=True)
        assert job.status == JobStatus.succeeded and job.lease_owner is None
        assert job.lease_token is None
        assert job.finished_at is not None and job.progress == {"step": 1}


def test_a_claim_taken_over_by_the_same_runner_fences_the_old_attempt(engine) -> None:
    """Two slots of one runner share its host:pid: after an outage expired the lease and another
    slot claimed the job again, the first attempt's writes must all be refused."""
    (job_id,) = _jobs(engine, 1)
    with new_session(engine) as session:
        first = claim_next_job(session, owner="host:1", lease_seconds=0.05).lease_token
        time.sleep(0.1)
        assert expire_leases(session, max_attempts=3) == [(job_id, "queued")]
        second = claim_next_job(session, owner="host:1", lease_seconds=60).lease_token
        assert second and second != first
        assert not renew_lease(session, job_id=job_id, token=first, lease_seconds=60)
        assert not record_progress(session, job_id=job_id, token=first, progress={"step": 9})
        assert not set_job_state(session, job_id=job_id, token=first, status=JobStatus.failed)
        assert (
            add_checkpoint(
                session,
                job_id=job_id,
                token=first,
                step=1,
                final=False,
                path="checkpoints/old",
                base_model="tiny",
                meta={},
            )
            is None
        )
        assert record_progress(session, job_id=job_id, token=second, progress={"step": 1})
        job = session.get(Job, job_id, populate_existing=True)
        assert job.status == JobStatus.running and job.progress == {"step": 1}
        assert job.attempts == 2


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
        token = session.get(Job, queued).lease_token
        assert not record_progress(session, job_id=queued, token=token, progress={"step": 2})
        cancelled = request_cancel(session, job_id=running, by="U1")
        assert cancelled.status == JobStatus.cancelled and cancelled.finished_at is not None
        with pytest.raises(Conflict, match="already ended"):
            request_cancel(session, job_id=running)
        with pytest.raises(NotFound):
            request_cancel(session, job_id=999_999)


def test_a_slack_job_is_claimed_only_once_its_thread_exists(engine) -> None:
    with new_session(engine) as session:
        job_id = create_job(session, base_model="tiny", config={}, channel_id="C1").id
        assert claim_next_job(session, owner="A", lease_seconds=60) is None
        job = session.get(Job, job_id)
        job.thread_ts = "1700000000.000100"
        session.add(job)
        session.commit()
        assert claim_next_job(session, owner="A", lease_seconds=60).id == job_id


def test_a_slack_job_whose_thread_never_came_is_cancelled_with_the_reason(engine) -> None:
    from datetime import timedelta

    with new_session(engine) as session:
        job_id = create_job(session, base_model="tiny", config={}, channel_id="C1").id
        assert expire_leases(session, max_attempts=3) == []  # young: the bot may be posting
        job = session.get(Job, job_id)
        job.created_at = job.created_at - timedelta(minutes=11)
        session.add(job)
        session.commit()
        assert expire_leases(session, max_attempts=3) == [(job_id, "cancelled")]
        job = session.get(Job, job_id, populate_existing=True)
        assert "thread was never posted" in job.error
        assert [e.kind for e in job_events(session, job_id=job_id)][-1] == "cancelled"


def test_requeue_refunds_the_attempt_only_when_asked(engine) -> None:
    (job_id,) = _jobs(engine, 1)
    with new_session(engine) as session:
        token = claim_next_job(session, owner="A", lease_seconds=60).lease_token
        assert requeue_job(session, job_id=job_id, token=token, reason="stop", refund_attempt=True)
        job = session.get(Job, job_id, populate_existing=True)
        assert job.status == JobStatus.queued and job.attempts == 0 and job.lease_token is None
        assert not requeue_job(session, job_id=job_id, token=token, reason="x", refund_attempt=True)
        token = claim_next_job(session, owner="A", lease_seconds=60).lease_token
        assert requeue_job(session, job_id=job_id, token=token, reason="x", refund_attempt=False)
        job = session.get(Job, job_id, populate_existing=True)
        assert job.attempts == 1
        kinds = [e.kind for e in job_events(session, job_id=job_id)]
        assert kinds == ["queued", "claimed", "requeued", "claimed", "requeued"]


def test_registering_a_checkpoint_twice_keeps_one_row(engine) -> None:
    (job_id,) = _jobs(engine, 1)
    with new_session(engine) as session:
        token = claim_next_job(session, owner="A", lease_seconds=60).lease_token
        fields = dict(step=5, final=False, path="checkpoints/j/5", base_model="tiny", meta={})
        first = add_checkpoint(session, job_id=job_id, token=token, **fields)
        again = add_checkpoint(session, job_id=job_id, token=token, **fields)
        assert first is not None and again is not None and first.id == again.id
        kinds = [e.kind for e in job_events(session, job_id=job_id)]
        assert kinds.count("checkpoint") == 1


def test_history_past_its_retention_is_pruned_and_the_rest_kept(engine) -> None:
    from datetime import timedelta

    from storage.models import JobEvent, SlackEvent
    from storage.types import utcnow

    done, running = _jobs(engine, 2)
    old = utcnow() - timedelta(days=100)
    with new_session(engine) as session:
        for job_id, status in ((done, JobStatus.succeeded), (running, JobStatus.running)):
            job = session.get(Job, job_id)
            job.status = status.value
            session.add(job)
            session.add(JobEvent(job_id=job_id, kind="progress", created_at=old, delivered_at=old))
        session.add(JobEvent(job_id=done, kind="progress", created_at=old))  # never delivered
        session.add(SlackEvent(event_id="Ev-old", received_at=old))
        session.add(SlackEvent(event_id="Ev-new"))
        session.commit()
        pruned = prune_history(
            session,
            job_events_older_than=timedelta(days=90),
            slack_events_older_than=timedelta(days=1),
        )
        assert pruned == (1, 1)
        left = session.exec(select(JobEvent).where(JobEvent.created_at < utcnow())).all()
        kept = {(e.job_id, e.delivered_at is None) for e in left if e.kind == "progress"}
        assert kept == {(running, False), (done, True)}
        assert [e.event_id for e in session.exec(select(SlackEvent)).all()] == ["Ev-new"]


def test_lease_times_come_from_the_database_clock(postgres_url, monkeypatch) -> None:
    """A runner host whose clock is an hour fast must not hand out hour-long leases (or expire
    others' leases early): PostgreSQL's now() decides."""
    from datetime import timedelta

    import storage.jobs
    from storage.migrate import upgrade
    from storage.types import utcnow

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    try:
        _jobs(engine, 1)
        monkeypatch.setattr(storage.jobs, "utcnow", lambda: utcnow() + timedelta(hours=1))
        with new_session(engine) as session:
            job = claim_next_job(session, owner="fast-clock", lease_seconds=60)
            database_now = storage.jobs.db_now(session)
            assert abs((job.lease_expires_at - database_now).total_seconds() - 60) < 5
            assert expire_leases(session, max_attempts=3) == []
    finally:
        engine.dispose()
