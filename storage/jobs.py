"""The job queue and its outbox. Jobs are rows; a runner claims one atomically and gets a lease
with a fencing token of its own (``jobs.lease_token``, new at every claim). It renews the lease by
heartbeat, and every write an attempt makes checks that token, so an attempt whose claim was taken
over (its lease ran out during an outage and the job was claimed again, by another runner or by
another slot of the same one) can no longer change the job.

Lease times come from the database's clock on PostgreSQL (``statement_timestamp()``), so runners
on hosts whose clocks disagree still agree on when a lease has run out. SQLite is one machine: its
clock is ours.

Claiming: ``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL (many runners on many hosts share one
queue); on SQLite one guarded ``UPDATE … WHERE status = 'queued'``, which SQLite serialises. A job
queued from Slack is claimable only once its thread exists (its root message posted): the thread
shows what happens to it from the first event on.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, or_, update
from sqlmodel import Session, col, select

from core.enums import JobKind, JobStatus
from core.errors import ConfigError, NotFound
from storage.models import Checkpoint, Dataset, Job, JobEvent, SlackEvent
from storage.types import utcnow

ACTIVE = (JobStatus.running.value, JobStatus.evaluating.value)
# A Slack job whose root message never got posted (the bot died between queueing it and posting)
# would wait unclaimable forever: after this long it is cancelled with the reason.
THREADLESS_TIMEOUT = timedelta(minutes=10)


def db_now(session: Session) -> datetime:
    """The database's clock: every lease time is computed and compared with it. (Not ``now()``:
    that is the start of the transaction, which a session may have held open for a while.)"""
    if session.get_bind().dialect.name == "postgresql":
        value = session.execute(select(func.statement_timestamp())).scalar_one()
        assert isinstance(value, datetime)
        return value
    return utcnow()


def new_lease_token() -> str:
    return uuid.uuid4().hex


# PostgreSQL's LISTEN/NOTIFY channel on which runners hear that a job became claimable (queued,
# requeued, or given its Slack thread): they claim it at once instead of at their next poll.
QUEUE_CHANNEL = "finetune_jobs"


def notify_queue(session: Session) -> None:
    """Tell listening runners that the queue changed, when the current transaction commits
    (PostgreSQL delivers a NOTIFY at commit, and not at all on rollback); a no-op on SQLite,
    whose runners poll."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(QUEUE_CHANNEL, "")))


def set_job_thread(session: Session, *, job: Job, thread_ts: str) -> Job:
    """Give a job its Slack thread (its root message's ts), which makes it claimable; commits."""
    job.thread_ts = thread_ts
    session.add(job)
    notify_queue(session)
    session.commit()
    return job


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
    thread_ts: str | None = None,
    commit: bool = True,
) -> Job:
    """Queue a job (and its ``queued`` event). ``commit=False`` leaves the commit to the caller,
    for a job queued in one transaction with other writes. A training job is checked first
    (``check_training_job``): its base model is the ``base=checkpoint-N`` it names, if any."""
    if kind == JobKind.train:
        base_model = check_training_job(
            session,
            config=config,
            dataset_id=dataset_id,
            base_model=base_model,
            channel_id=channel_id,
        )
    job = Job(
        kind=kind.value,
        base_model=base_model,
        config=config,
        dataset_id=dataset_id,
        requested_by=requested_by,
        channel_id=channel_id,
        thread_ts=thread_ts,
    )
    session.add(job)
    session.flush()
    assert job.id is not None
    add_job_event(session, job_id=job.id, kind="queued")
    notify_queue(session)
    if commit:
        session.commit()
    return job


def check_training_job(
    session: Session,
    *,
    config: dict[str, Any],
    dataset_id: int | None,
    base_model: str,
    channel_id: str | None = None,
) -> str:
    """The base model a training job trains on: ``base_model``, or the ``checkpoint-N`` its
    config names as ``base`` (a stage=pt checkpoint of a job on ``base_model``, of the job's
    channel or the deployment's). ConfigError (NotFound) when the dataset's kind does not fit the
    job's stage or the base is not one."""
    from storage.datasets import stage_problem

    dataset = session.get(Dataset, dataset_id) if dataset_id is not None else None
    problem = stage_problem(dataset, config.get("stage", "sft")) if dataset else None
    if problem:
        raise ConfigError(problem)
    base = config.get("base")
    if not base:
        return base_model
    checkpoint_id = int(str(base).removeprefix("checkpoint-"))
    checkpoint = session.get(Checkpoint, checkpoint_id)
    trained_by = session.get(Job, checkpoint.job_id) if checkpoint is not None else None
    foreign = (  # another channel's checkpoint is not there for this one
        trained_by is not None
        and channel_id is not None
        and trained_by.channel_id not in (None, channel_id)
    )
    if checkpoint is None or trained_by is None or foreign:
        raise NotFound(f"base={base}: no checkpoint {checkpoint_id} (`/finetune checkpoints`)")
    if checkpoint.meta.get("stage") != "pt":
        raise ConfigError(
            f"base={base} is not a stage=pt checkpoint: base= starts an SFT job from continued "
            "pre-training; to train further on an SFT checkpoint's data, start a new job"
        )
    if checkpoint.base_model != base_model:
        raise ConfigError(
            f"base={base} was pre-trained on {checkpoint.base_model}, and this deployment "
            f"trains on {base_model}"
        )
    return f"checkpoint-{checkpoint_id}"


def claim_next_job(
    session: Session,
    *,
    owner: str,
    lease_seconds: float,
    kinds: Sequence[JobKind] | None = None,
) -> Job | None:
    """Take the oldest claimable job (of ``kinds``, default any), or None. The job comes back
    running, leased to ``owner`` (host:pid, for people) under a new ``lease_token`` (for fencing:
    pass it to every write)."""
    now = db_now(session)
    expires = now + timedelta(seconds=lease_seconds)
    token = new_lease_token()
    claimable = [
        col(Job.status) == JobStatus.queued.value,
        or_(col(Job.channel_id).is_(None), col(Job.thread_ts).is_not(None)),
    ]
    if kinds is not None:
        claimable.append(col(Job.kind).in_([k.value for k in kinds]))
    if session.get_bind().dialect.name == "postgresql":
        job = session.exec(
            select(Job)
            .where(*claimable)
            .order_by(col(Job.id))
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if job is None:
            session.rollback()
            return None
        job_id = job.id
        session.execute(_claim(job_id, owner, token, now, expires))
    else:
        oldest = select(Job.id).where(*claimable).order_by(col(Job.id)).limit(1).scalar_subquery()
        result = session.execute(
            _claim(oldest, owner, token, now, expires)
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


def _claim(job_id: Any, owner: str, token: str, now: Any, expires: Any) -> Any:
    return (
        update(Job)
        .where(col(Job.id) == job_id)
        .values(
            status=JobStatus.running.value,
            lease_owner=owner,
            lease_token=token,
            lease_expires_at=expires,
            attempts=Job.attempts + 1,
            started_at=now,
        )
    )


def _held(job_id: int, token: str) -> Any:
    """The WHERE clause of every write an attempt makes: its claim is still the current one."""
    return (col(Job.id) == job_id, col(Job.lease_token) == token, col(Job.status).in_(ACTIVE))


def renew_lease(session: Session, *, job_id: int, token: str, lease_seconds: float) -> bool:
    """Extend the lease; False when the claim ``token`` is no longer current (abandon the job)."""
    expires = db_now(session) + timedelta(seconds=lease_seconds)
    result = session.execute(
        update(Job).where(*_held(job_id, token)).values(lease_expires_at=expires)
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def holds_lease(session: Session, *, job_id: int, token: str) -> bool:
    found = session.exec(select(Job.id).where(*_held(job_id, token))).first()
    return found is not None


def set_job_state(
    session: Session,
    *,
    job_id: int,
    token: str,
    status: JobStatus,
    error: str | None = None,
    event: str | None = None,
    **payload: Any,
) -> bool:
    """Move a leased job to ``status`` (and record an event); False if the claim is no longer
    current."""
    values: dict[str, Any] = {"status": status.value}
    if status.finished:
        values.update(
            finished_at=utcnow(), lease_owner=None, lease_token=None, lease_expires_at=None
        )
    if error is not None:
        values["error"] = error
    result = session.execute(update(Job).where(*_held(job_id, token)).values(**values))
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
    session: Session, *, job_id: int, token: str, progress: dict[str, Any], event: str = "progress"
) -> bool:
    """Store the latest progress on the job and append it to the outbox; returns whether the
    job should go on (False when cancel was requested or the claim is no longer current)."""
    result = session.execute(update(Job).where(*_held(job_id, token)).values(progress=progress))
    if not result.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return False
    add_job_event(session, job_id=job_id, kind=event, **progress)
    session.commit()
    return not cancel_requested(session, job_id=job_id)


def requeue_job(
    session: Session, *, job_id: int, token: str, reason: str, refund_attempt: bool
) -> bool:
    """Put a leased job back in the queue (it resumes from its last checkpoint). ``refund_attempt``:
    the attempt does not count against ``RUNNER_MAX_ATTEMPTS`` (the job was stopped, not failing:
    its runner shut down, the database was away). False if the claim is no longer current."""
    values: dict[str, Any] = {
        "status": JobStatus.queued.value,
        "lease_owner": None,
        "lease_token": None,
        "lease_expires_at": None,
    }
    if refund_attempt:
        values["attempts"] = case((col(Job.attempts) > 0, col(Job.attempts) - 1), else_=0)
    result = session.execute(update(Job).where(*_held(job_id, token)).values(**values))
    if not result.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return False
    add_job_event(session, job_id=job_id, kind="requeued", reason=reason)
    notify_queue(session)
    session.commit()
    return True


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


def expire_leases(
    session: Session, *, max_attempts: int, alive: Collection[str] = ()
) -> list[tuple[int, str]]:
    """Jobs whose lease ran out (by the database's clock): queued again (to resume from their
    last checkpoint) while they have attempts left, else failed with the reason; and Slack jobs
    whose thread was never posted, cancelled. Returns (job id, new status).

    ``alive``: the claim tokens of jobs whose process the caller itself runs and sees alive. A
    runner never expires those: a heartbeat late behind a busy database is not a lost runner
    (its next heartbeat renews them; another runner still expires them if this one dies)."""
    now = db_now(session)
    query = select(Job).where(col(Job.status).in_(ACTIVE), col(Job.lease_expires_at) < now)
    if alive:
        query = query.where(
            or_(col(Job.lease_token).is_(None), col(Job.lease_token).not_in(list(alive)))
        )
    stale = session.exec(query.with_for_update(skip_locked=True)).all()
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
        job.lease_owner, job.lease_token, job.lease_expires_at = None, None, None
        session.add(job)
        changed.append((job.id, job.status))
    if any(status == JobStatus.queued.value for _, status in changed):
        notify_queue(session)
    threadless = session.exec(
        select(Job)
        .where(
            col(Job.status) == JobStatus.queued.value,
            col(Job.channel_id).is_not(None),
            col(Job.thread_ts).is_(None),
            col(Job.created_at) < now - THREADLESS_TIMEOUT,
        )
        .with_for_update(skip_locked=True)
    ).all()
    for job in threadless:
        assert job.id is not None
        job.status, job.finished_at, job.cancel_requested = JobStatus.cancelled.value, now, True
        job.error = "its Slack thread was never posted (the bot stopped while queueing it)"
        add_job_event(session, job_id=job.id, kind="cancelled", reason=job.error)
        session.add(job)
        changed.append((job.id, job.status))
    session.commit()
    return changed


def prune_history(
    session: Session, *, job_events_older_than: timedelta, slack_events_older_than: timedelta
) -> tuple[int, int]:
    """Delete delivered events of finished jobs, and Slack event ids, older than their retention;
    returns how many of each went. Jobs, checkpoints, evaluations, promotions and the audit log
    are kept."""
    now = db_now(session)
    finished = select(Job.id).where(col(Job.status).in_([s.value for s in JobStatus if s.finished]))
    events = session.execute(
        delete(JobEvent).where(
            col(JobEvent.delivered_at).is_not(None),
            col(JobEvent.created_at) < now - job_events_older_than,
            col(JobEvent.job_id).in_(finished),
        )
    ).rowcount  # type: ignore[attr-defined]
    slack = session.execute(
        delete(SlackEvent).where(col(SlackEvent.received_at) < now - slack_events_older_than)
    ).rowcount  # type: ignore[attr-defined]
    session.commit()
    return int(events or 0), int(slack or 0)


def job_checkpoints(session: Session, *, job_id: int) -> list[Checkpoint]:
    """A job's checkpoints, newest first (the order a resume tries them in)."""
    return list(
        session.exec(
            select(Checkpoint)
            .where(Checkpoint.job_id == job_id)
            .order_by(col(Checkpoint.step).desc(), col(Checkpoint.id).desc())
        )
    )


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
    token: str,
    step: int,
    final: bool,
    path: str,
    base_model: str,
    meta: dict[str, Any],
) -> Checkpoint | None:
    """Register a saved checkpoint if the claim ``token`` is still current; the same path
    registered twice (a retried registration) comes back as the row already there."""
    if not holds_lease(session, job_id=job_id, token=token):
        return None
    existing = session.exec(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.path == path)
    ).first()
    if existing is not None:
        return existing
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
