"""The database as one job attempt sees it: every write fenced by the attempt's claim token and
retried through a database outage.

A PostgreSQL restart or a dropped connection must not fail a job that trains fine. Writes the step
loop makes (progress, cancel polls, checkpoint registrations) are tried once and, when the database
does not answer, kept for later: training goes on, the newest progress and every checkpoint are
written when it answers again. Writes that end a phase (the job's state, the evaluation) wait for
the database with bounded backoff. If it stays away longer than ``outage_seconds`` the attempt gives
up with ``DatabaseAway`` and its process exits with ``EXIT_REQUEUE``: the runner puts the job back
in the queue without counting the attempt (its lease would have run out by then anyway).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session

from storage.db import new_session

log = logging.getLogger(__name__)

T = TypeVar("T")

# The job process's exit status asking its runner to requeue the job without counting the attempt
# (EX_TEMPFAIL): the database stayed unreachable, or the process was told to stop (SIGTERM) and
# could not record that itself.
EXIT_REQUEUE = 75


class DatabaseAway(Exception):
    """The database did not answer for longer than the attempt waits."""


class ClaimLost(Exception):
    """Another attempt holds the job now (this attempt's lease ran out and it was claimed again):
    this attempt must stop without writing anything more."""


def is_connection_error(exc: BaseException) -> bool:
    """A database that does not answer (restart, network, a killed connection), as opposed to a
    bug or a constraint violation. SQLite's "database is locked" counts: it passes too."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class JobDb:
    def __init__(
        self,
        engine: Engine,
        *,
        job_id: int,
        token: str,
        outage_seconds: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.job_id = job_id
        self.token = token
        self.outage_seconds = outage_seconds
        self.sleep = sleep
        self.clock = clock
        self.away_since: float | None = None  # when the current outage started, for the logs

    def once(self, write: Callable[[Session], T]) -> T:
        """One try; raises the database error (a caller that can wait uses ``wait``)."""
        with new_session(self.engine) as session:
            try:
                result = write(session)
            except BaseException:
                session.rollback()
                raise
        if self.away_since is not None:
            log.warning(
                "job %d: the database answers again after %.1f s",
                self.job_id,
                self.clock() - self.away_since,
            )
            self.away_since = None
        return result

    def try_once(self, write: Callable[[Session], T]) -> tuple[bool, T | None]:
        """(True, result), or (False, None) when the database did not answer."""
        try:
            return True, self.once(write)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            self._note_away(exc)
            return False, None

    def wait(self, write: Callable[[Session], T]) -> T:
        """Retry ``write`` with backoff (0.25 s doubling to 5 s) until it goes through, or raise
        DatabaseAway once the database has not answered for ``outage_seconds`` (counted from the
        first failure: a write that itself runs long, an evaluation, is not an outage)."""
        failed_at: float | None = None
        delay = 0.25
        while True:
            try:
                return self.once(write)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                self._note_away(exc)
                failed_at = self.clock() if failed_at is None else failed_at
                waited = self.clock() - failed_at
                if waited >= self.outage_seconds:
                    raise DatabaseAway(
                        f"the database did not answer for {waited:.0f} s "
                        f"(last error: {type(exc).__name__})"
                    ) from exc
                self.sleep(min(delay, max(self.outage_seconds - waited, 0.05)))
                delay = min(delay * 2, 5.0)

    def _note_away(self, exc: BaseException) -> None:
        if self.away_since is None:
            self.away_since = self.clock()
            log.warning(
                "job %d: the database does not answer (%r); training goes on, its progress "
                "is kept until it answers",
                self.job_id,
                exc,
            )

    def dispose(self) -> None:
        self.engine.dispose()


def fenced(result: Any) -> Any:
    """A write's result, or ClaimLost when the write found the claim no longer current."""
    if result is False or result is None:
        raise ClaimLost("this attempt's claim on the job was taken over")
    return result
