"""The outbox as the notifier reads and settles it, and the lock that lets one process relay it.

Pending work is read per job (each job's oldest undelivered events first, a bounded number of
jobs and of events per job), so one job with a long backlog cannot fill every round. An event is
settled by setting ``delivered_at``; ``delivery_error`` says what of it did not reach Slack.

The relay lock: PostgreSQL, a session-level advisory lock held on a connection of its own for as
long as the notifier runs (the server drops it when that connection ends); SQLite, an exclusive
``flock`` on ``<database file>.notifier.lock`` (the kernel drops it when the process ends).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from sqlalchemy import func, or_, text, update
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, col, select

from core.errors import ConfigError
from storage.models import Job, JobEvent
from storage.types import utcnow

log = logging.getLogger(__name__)

THREAD_ERROR_CHARS = 300  # jobs.thread_error's width
# pg_try_advisory_lock's key for the notifier: b"ftbnotif" read as a (positive) big-endian int64.
NOTIFIER_LOCK_KEY = int.from_bytes(b"ftbnotif", "big")


# Reading pending work ---------------------------------------------------------------------------


def jobs_with_pending_events(
    session: Session, *, limit: int, skip_channels: Sequence[str] = ()
) -> list[tuple[int, str | None]]:
    """(job id, channel) of jobs with undelivered events, oldest first, leaving out jobs in
    ``skip_channels`` (paused ones) so they take no place in the batch."""
    oldest = func.min(JobEvent.id)
    query = (
        select(JobEvent.job_id, Job.channel_id, oldest)
        .join(Job, col(Job.id) == col(JobEvent.job_id))
        .where(col(JobEvent.delivered_at).is_(None))
        .group_by(col(JobEvent.job_id), col(Job.channel_id))
        .order_by(oldest)
        .limit(limit)
    )
    if skip_channels:
        query = query.where(
            or_(col(Job.channel_id).is_(None), col(Job.channel_id).not_in(list(skip_channels)))
        )
    return [(job_id, channel) for job_id, channel, _ in session.exec(query).all()]


def pending_events(session: Session, *, job_id: int, limit: int) -> list[JobEvent]:
    """A job's undelivered events in the order they happened, at most ``limit``."""
    return list(
        session.exec(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, col(JobEvent.delivered_at).is_(None))
            .order_by(col(JobEvent.id))
            .limit(limit)
            .execution_options(populate_existing=True)
        ).all()
    )


def previous_progress(session: Session, event: JobEvent) -> JobEvent | None:
    """The job's progress event before ``event``, delivered or not."""
    return session.exec(
        select(JobEvent)
        .where(
            JobEvent.job_id == event.job_id,
            JobEvent.kind == "progress",
            col(JobEvent.id) < event.id,
        )
        .order_by(col(JobEvent.id).desc())
    ).first()


def thread_moves(session: Session, *, job_id: int) -> int:
    """How many times the job's thread moved to a fresh root message."""
    return len(
        session.exec(
            select(JobEvent.id).where(JobEvent.job_id == job_id, JobEvent.kind == "thread_moved")
        ).all()
    )


# Settling -------------------------------------------------------------------------------------


def mark_delivered(
    session: Session, events: Sequence[JobEvent], *, error: str | None = None
) -> int:
    """Settle ``events``: delivered now; ``error`` (if given) replaces their delivery_error."""
    now = utcnow()
    for event in events:
        event.delivered_at = now
        if error is not None:
            event.delivery_error = error
        session.add(event)
    session.commit()
    return len(events)


def give_up_thread(session: Session, *, job_id: int, reason: str) -> int:
    """The job's thread cannot be written any more: record why on the job and settle all its
    undelivered events with that reason. Returns how many events were settled."""
    reason = reason[:THREAD_ERROR_CHARS]
    session.execute(update(Job).where(col(Job.id) == job_id).values(thread_error=reason))
    settled = session.execute(
        update(JobEvent)
        .where(col(JobEvent.job_id) == job_id, col(JobEvent.delivered_at).is_(None))
        .values(delivered_at=utcnow(), delivery_error=f"thread given up: {reason}")
    ).rowcount  # type: ignore[attr-defined]
    session.commit()
    return int(settled)


def move_thread(session: Session, *, job_id: int, old_ts: str, new_ts: str, reason: str) -> bool:
    """The job's thread continues under a fresh root message ``new_ts``; recorded as a
    ``thread_moved`` event that is born delivered (a record, nothing to relay). False (and
    nothing written) when the job's thread is no longer ``old_ts``."""
    moved = session.execute(
        update(Job)
        .where(col(Job.id) == job_id, col(Job.thread_ts) == old_ts)
        .values(thread_ts=new_ts)
    ).rowcount  # type: ignore[attr-defined]
    if not moved:
        session.rollback()
        return False
    session.add(
        JobEvent(
            job_id=job_id,
            kind="thread_moved",
            payload={"from_ts": old_ts, "to_ts": new_ts, "reason": reason},
            delivered_at=utcnow(),
        )
    )
    session.commit()
    return True


# The relay lock -------------------------------------------------------------------------------


class RelayLock(Protocol):
    def acquire(self) -> bool:
        """True when this process holds the lock now (taking it if it is free); never waits."""

    def release(self) -> None: ...

    def describe(self) -> str: ...


def relay_lock(engine: Engine) -> RelayLock:
    """The lock for ``engine``'s database."""
    if engine.dialect.name == "postgresql":
        return AdvisoryRelayLock(engine)
    if engine.dialect.name != "sqlite":
        raise ConfigError(
            f"DATABASE_URL: the notifier relays from SQLite or PostgreSQL, not {engine.dialect.name}"
        )
    database = engine.url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        path = Path(database).expanduser().resolve()
        return FileRelayLock(path.with_name(path.name + ".notifier.lock"))
    return ProcessRelayLock()


class AdvisoryRelayLock:
    """``pg_try_advisory_lock`` on a connection kept for the lock alone. Each ``acquire`` checks
    that connection still holds it: if the connection died, the server released the lock, so
    it is taken again (or left to whoever took it meanwhile)."""

    def __init__(self, engine: Engine, key: int = NOTIFIER_LOCK_KEY) -> None:
        self.engine = engine
        self.key = key
        self._connection: Connection | None = None

    def describe(self) -> str:
        return f"PostgreSQL advisory lock {self.key}"

    def acquire(self) -> bool:
        if self._connection is not None:
            if self._still_held(self._connection):
                return True
            log.warning("lost the %s (its connection ended)", self.describe())
            self._drop()
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            taken = connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}
            ).scalar_one()
        except BaseException:
            connection.invalidate()
            connection.close()
            raise
        if not taken:
            connection.close()  # back to the pool: it holds nothing
            return False
        connection.detach()  # closing it really closes it, so the lock never idles in the pool
        self._connection = connection
        return True

    def _still_held(self, connection: Connection) -> bool:
        try:
            return bool(
                connection.execute(
                    text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND granted AND pid = pg_backend_pid() AND objsubid = 1 "
                        "AND ((classid::bigint << 32) | objid::bigint) = :key"
                    ),
                    {"key": self.key},
                ).scalar_one()
            )
        except Exception:  # the connection is gone, and the lock with it
            log.debug("advisory lock check failed", exc_info=True)
            return False

    def _drop(self) -> None:
        if self._connection is not None:
            try:
                self._connection.invalidate()
                self._connection.close()
            except Exception:
                log.debug("closing the lock connection failed", exc_info=True)
            self._connection = None

    def release(self) -> None:
        if self._connection is None:
            return
        try:
            self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            self._connection.close()
        except Exception:  # the connection died: the server dropped the lock already
            log.debug("advisory unlock failed", exc_info=True)
        self._connection = None


class FileRelayLock:
    """An exclusive ``flock`` on a file beside the SQLite database. flock locks belong to an open
    file description, so a second opening conflicts even within one process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def describe(self) -> str:
        return f"lock file {self.path}"

    def acquire(self) -> bool:
        import fcntl

        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for an operator: who relays
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None


class ProcessRelayLock:
    """An in-memory SQLite database lives in one process: nothing to share, always held."""

    def describe(self) -> str:
        return "this process (in-memory database)"

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        return None
