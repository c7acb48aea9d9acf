"""The job queue and its outbox. Jobs are rows; a runner claims one atomically, holds a lease it
renews by heartbeat, and every write it makes later checks it still holds that lease, so a runner
whose lease was taken over (it hung, its host was lost) can no longer change the job.

Claiming: ``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL (many runners on many hosts share one
queue); on SQLite one guarded ``UPDATE … WHERE status = 'queued'``, which SQLite serialises.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from core.enums import JobKind, JobStatus
from storage.models import Checkpoint, Job, JobEvent
from storage.types import utcnow

ACTIVE = (JobStatus.running.value, JobStatus.evaluating.value)


def add_job_event(session: Session, *, job_id: int, kind: str, **payload: Any) -> JobEvent:
    event = JobEvent(job_id=job_id, kind=kind, payload=payload)
    session.add(event)
    return event


def create_job(
    session: Session,
    *,
    base_model: str,
    config: dict[str, Any],
    dataset_id: int | None = None,
    kind: JobKind = JobKind.train,
    requested_by: str | None = None,
    channel_id: str | None = None,
) -> Job:
    job = Job(
        kind=kind.value,
        base_model=base_model,
        config=config,
        dataset_id=dataset_id,
        requested_by=requested_by,
        channel_id=channel_id,
    )
    session.add(job)
    session.flush()
    assert job.id is not None
    add_job_event(session, job_id=job.id, kind="queued")
    session.commit()
    return job


def claim_next_job(session: Session, *, owner: str, lease_seconds: float) -> Job | None:
    """Take the oldest queued job, or None. The job comes back running, leased to ``owner``."""
    now = utcnow()
    expires = now + timedelta(seconds=lease_seconds)
    if session.get_bind().dialect.name == "postgresql":
        job = session.exec(
            select(Job)
            .where(Job.status == JobStatus.queued.value)
            .order_by(col(Job.id))
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if job is None:
            session.rollback()
            return None
        job_id = job.id
        session.execute(_claim(job_id, owner, now, expires))
    else:
        oldest = (
            select(Job.id)
            .where(Job.status == JobStatus.queued.value)
            .order_by(col(Job.id))
            .limit(1)
            .scalar_subquery()
        )
        result = session.execute(
            _claim(oldest, owner, now, expires)
            .where(Job.status == JobStatus.queued.value)
            .returning(Job.id)  # type: ignore[arg-type]
        ).first()
        if result is None:
            session.rollback()
            return None
        job_id = result[0]
    assert job_id is not None
    add_job_event(session, job_id=job_id, kind="claimed", owner=owner)
    session.commit()
    claimed = session.get(Job, job_id, populate_existing=True)
    assert claimed is not None
    return claimed


def _claim(job_id: Any, owner: str, now: Any, expires: Any) -> Any:
    return (
        update(Job)
        .where(col(Job.id) == job_id)
        .values(
            status=JobStatus.running.value,
            lease_owner=owner,
            lease_expires_at=expires,
            attempts=Job.attempts + 1,
            started_at=now,
        )
    )


def renew_lease(session: Session, *, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; False when ``owner`` no longer holds it (the job must be abandoned)."""
    result = session.execute(
        update(Job)
        .where(col(Job.id) == job_id, col(Job.lease_owner) == owner, col(Job.status).in_(ACTIVE))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def set_job_state(
    session: Session,
    *,
    job_id: int,
    owner: str,
    status: JobStatus,
    error: str | None = None,
    event: str | None = None,
    **payload: Any,
) -> bool:
    """Move a leased job to ``status`` (and record an event); False if the lease was lost."""
    values: dict[str, Any] = {"status": status.value}
    if status.finished:
        values.update(finished_at=utcnow(), lease_owner=None, lease_expires_at=None)
    if error is not None:
        values["error"] = error
    result = session.execute(
        update(Job)
        .where(col(Job.id) == job_id, col(Job.lease_owner) == owner, col(Job.status).in_(ACTIVE))
        .values(**values)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return False
    kind = event or status.value
    if error is not None:
        payload["error"] = error
    add_job_event(session, job_id=job_id, kind=kind, **payload)
    session.commit()
    return True


def record_progress(
    session: Session, *, job_id: int, owner: str, progress: dict[str, Any], event: str = "progress"
) -> bool:
    """Store the latest progress on the job and append it to the outbox; returns whether the
    job should go on (False when cancel was requested or the lease is lost)."""
    result = session.execute(
        update(Job)
        .where(col(Job.id) == job_id, col(Job.lease_owner) == owner, col(Job.status).in_(ACTIVE))
        .values(progress=progress)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return False
    add_job_event(session, job_id=job_id, kind=event, **progress)
    session.commit()
    return not cancel_requested(session, job_id=job_id)


def cancel_requested(session: Session, *, job_id: int) -> bool:
    value = session.exec(select(Job.cancel_requested).where(Job.id == job_id)).first()
    return bool(value)


def request_cancel(session: Session, *, job_id: int, by: str | None = None) -> Job:
    """A queued job is cancelled at once; a running one is flagged and stops within seconds."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        from core.errors import NotFound

        raise NotFound(f"no job {job_id}")
    if JobStatus(job.status).finished:
        from core.errors import Conflict

        raise Conflict(f"job {job_id} already ended ({job.status})")
    cancelled = session.execute(
        update(Job)
        .where(col(Job.id) == job_id, col(Job.status) == JobStatus.queued.value)
        .values(status=JobStatus.cancelled.value, finished_at=utcnow(), cancel_requested=True)
    ).rowcount  # type: ignore[attr-defined]
    if cancelled:
        add_job_event(
            session, job_id=job_id, kind="cancelled", by=by, reason="cancelled before it started"
        )
    else:
        session.execute(update(Job).where(col(Job.id) == job_id).values(cancel_requested=True))
        add_job_event(session, job_id=job_id, kind="cancel_requested", by=by)
    session.commit()
    refreshed = session.get(Job, job_id, populate_existing=True)
    assert refreshed is not None
    return refreshed


def expire_leases(session: Session, *, max_attempts: int) -> list[tuple[int, str]]:
    """Jobs whose lease ran out: queued again (to resume from their last checkpoint) while they
    have attempts left, else failed with the reason. Returns (job id, new status)."""
    now = utcnow()
    stale = session.exec(
        select(Job)
        .where(col(Job.status).in_(ACTIVE), col(Job.lease_expires_at) < now)
        .with_for_update(skip_locked=True)
    ).all()
    changed = []
    for job in stale:
        assert job.id is not None
        owner = job.lease_owner
        if job.cancel_requested:
            job.status, job.finished_at = JobStatus.cancelled.value, now
            add_job_event(
                session,
                job_id=job.id,
                kind="cancelled",
                reason=f"its runner {owner} stopped answering after cancel",
            )
        elif job.attempts < max_attempts:
            job.status = JobStatus.queued.value
            add_job_event(
                session,
                job_id=job.id,
                kind="requeued",
                owner=owner,
                attempt=job.attempts,
                reason="its runner stopped answering; it resumes from its last checkpoint",
            )
        else:
            job.status, job.finished_at = JobStatus.failed.value, now
            job.error = (
                f"its runner stopped answering {job.attempts} times (last: {owner}); giving up"
            )
            add_job_event(session, job_id=job.id, kind="failed", error=job.error)
        job.lease_owner, job.lease_expires_at = None, None
        session.add(job)
        changed.append((job.id, job.status))
    session.commit()
    return changed


def latest_checkpoint(session: Session, *, job_id: int) -> Checkpoint | None:
    return session.exec(
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id)
        .order_by(col(Checkpoint.step).desc(), col(Checkpoint.id).desc())
    ).first()


def add_checkpoint(
    session: Session,
    *,
    job_id: int,
    owner: str,
    step: int,
    final: bool,
    path: str,
    base_model: str,
    meta: dict[str, Any],
) -> Checkpoint | None:
    """Register a saved checkpoint if ``owner`` still holds the job's lease."""
    holds = session.exec(select(Job.id).where(Job.id == job_id, Job.lease_owner == owner)).first()
    if holds is None:
        return None
    checkpoint = Checkpoint(
        job_id=job_id, step=step, final=final, path=path, base_model=base_model, meta=meta
    )
    session.add(checkpoint)
    session.flush()
    add_job_event(
        session,
        job_id=job_id,
        kind="checkpoint",
        step=step,
        final=final,
        checkpoint_id=checkpoint.id,
    )
    session.commit()
    return checkpoint


def job_events(session: Session, *, job_id: int) -> list[JobEvent]:
    return list(
        session.exec(select(JobEvent).where(JobEvent.job_id == job_id).order_by(col(JobEvent.id)))
    )
