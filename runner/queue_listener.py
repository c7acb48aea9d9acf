"""Wake the runner the moment a job becomes claimable: on PostgreSQL a dedicated connection
``LISTEN``s on ``storage.jobs.QUEUE_CHANNEL``, which every write that makes a job claimable
notifies (a new job, a requeue, a Slack job given its thread). Polling (``RUNNER_POLL_SECONDS``)
stays: it is the fallback when the connection is down and the only way on SQLite.

A lost connection (a PostgreSQL restart) is reopened with backoff; reopening wakes the runner
once, since notifications sent meanwhile are gone.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import make_url

from storage.jobs import QUEUE_CHANNEL

log = logging.getLogger(__name__)


def listens(database_url: str) -> bool:
    return make_url(database_url).get_backend_name() == "postgresql"


class QueueListener:
    def __init__(self, database_url: str, wake: threading.Event, stop: threading.Event) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self.wake = wake
        self.stop = stop
        self.listening = threading.Event()  # set while LISTEN is in place (tests wait on it)
        self._thread = threading.Thread(target=self._run, name="queue-listener", daemon=True)

    def start(self) -> QueueListener:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        import psycopg

        delay = 0.5
        while not self.stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {QUEUE_CHANNEL}")
                    self.listening.set()
                    self.wake.set()  # whatever was queued while nobody listened
                    delay = 0.5
                    while not self.stop.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            self.wake.set()
            except psycopg.Error as exc:
                self.listening.clear()
                log.warning(
                    "listening for queued jobs failed (%s); polling meanwhile, retrying in %.1f s",
                    type(exc).__name__,
                    delay,
                )
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
        self.listening.clear()
