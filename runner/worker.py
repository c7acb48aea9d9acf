"""The runner loop: claim queued jobs, run each in a child process pinned to one GPU
(``CUDA_VISIBLE_DEVICES``; one CPU slot when there is no GPU) and dataset checks in slots of their
own (``RUNNER_INGEST_SLOTS``, no GPU), renew their leases by heartbeat,
reap children, and requeue or fail jobs whose runner vanished. APScheduler drives the timers.

Each slot remembers the claim token of its job: heartbeats, reaping and shutdown act on that claim
only, so a slot whose job was claimed again (after an outage expired its lease) neither renews nor
fails the live attempt. A database that does not answer is waited out: the timers skip their round
(logged once), jobs keep training, and what a reaped child left to record (its end, a requeue) is
kept until the database answers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import or_
from sqlmodel import col, select

from core.enums import JobKind, JobStatus
from core.settings import Settings
from runner.jobdb import EXIT_REQUEUE, is_connection_error
from runner.queue_listener import QueueListener, listens
from storage.db import make_engine, new_session
from storage.feedback import prune_feedback
from storage.jobs import (
    claim_next_job,
    expire_leases,
    holds_lease,
    prune_history,
    renew_lease,
    requeue_job,
    set_job_state,
)
from storage.models import Job

log = logging.getLogger(__name__)


@dataclass
class Slot:
    device: str | None  # a CUDA device id, or None for the CPU
    kinds: tuple[JobKind, ...] | None = None  # the job kinds it takes (None: any)
    process: BaseProcess | None = None
    job_id: int | None = None
    token: str | None = None  # the claim this slot's process works under
    conn: Any = None  # a warm worker's end of its pipe (None: a process per job)
    warm_key: str | None = None  # the base model the warm worker has resident

    @property
    def name(self) -> str:
        if self.kinds is not None and len(self.kinds) == 1 and self.kinds[0] in SIDE_SLOTS:
            return SIDE_SLOTS[self.kinds[0]]
        return f"cuda:{self.device}" if self.device is not None else "cpu"


# With dataset-check slots, the device slots leave uploads to them: a check never waits behind an
# hour of training, and checks never take a GPU. Distillations (a teacher over HTTP) likewise, in
# slots of their own: an hour of teacher requests never holds up an upload's check.
DEVICE_KINDS = (JobKind.train, JobKind.evaluate, JobKind.export)
SIDE_SLOTS = {JobKind.ingest: "dataset checks", JobKind.distill: "distillations"}


def detect_devices(settings: Settings) -> list[str | None]:
    if settings.runner_devices:
        return list(settings.runner_devices)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        return list(ids) if ids else [None]
    try:
        import torch

        count = torch.cuda.device_count()
    except ImportError:
        count = 0
    return [str(i) for i in range(count)] if count else [None]


@dataclass(frozen=True)
class Ended:
    """A job process that ended and what the runner still has to record for it."""

    job_id: int
    token: str
    exitcode: int | None


def _prepare_process(device: str | None, settings: Settings) -> None:
    """Pin the GPU before torch is imported; keep Triton's compiled kernels (runner/train/
    kernels.py) with the artifacts: compiled once per host (~2.5 s for a 7B's shapes), loaded in
    milliseconds by every later job."""
    os.environ["CUDA_VISIBLE_DEVICES"] = device if device is not None else ""
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(settings.artifact_dir) / "cache" / "triton"))
    if device is None and settings.runner_cpu_threads:  # read by torch when it starts
        os.environ.setdefault("OMP_NUM_THREADS", str(settings.runner_cpu_threads))


def _log_as(job_id: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s job {job_id} %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def _run_one(job_id: int, token: str, settings: Settings) -> Any:
    """Run the job; exits ``EXIT_REQUEUE`` when the database stayed away (the runner requeues
    the job)."""
    from runner.job import run_job
    from runner.jobdb import DatabaseAway

    try:
        return run_job(job_id, token, settings)
    except DatabaseAway as exc:
        logging.getLogger(__name__).error(
            "job %d: %s; asking the runner to requeue it", job_id, exc
        )
        sys.exit(EXIT_REQUEUE)


def _child_main(job_id: int, token: str, device: str | None, settings: Settings) -> None:
    """Entry point of a job's process: one job, then the process ends."""
    _prepare_process(device, settings)
    _log_as(job_id)
    from runner.job import STOP

    STOP.install()  # SIGTERM: checkpoint and requeue instead of dying mid-step
    _run_one(job_id, token, settings)


def _warm_main(conn: Any, device: str | None, settings: Settings) -> None:
    """Entry point of a warm worker: jobs one after another, each sent as (job id, token) and
    answered ("done", job id) once it ended by itself (succeeded, failed, cancelled). Anything
    else ends the process as a job's own process would end (a SIGTERM's requeue, a lost claim,
    the database away, a crash), so the runner reads its exit code as before. With no job for
    ``RUNNER_WARM_IDLE_SECONDS`` it exits, giving its memory back."""
    _prepare_process(device, settings)
    from runner import warm
    from runner.job import STOP

    warm.enable()
    STOP.install()
    while True:
        idle_until = time.monotonic() + settings.runner_warm_idle_seconds
        while not conn.poll(0.5):
            if STOP.requested.is_set():
                return  # SIGTERM between jobs: nothing to hand back
            if time.monotonic() >= idle_until:
                logging.getLogger(__name__).info("warm worker idle: exiting")
                return
        try:
            job_id, token = conn.recv()
        except EOFError:  # the runner is gone
            return
        _log_as(job_id)
        status = _run_one(job_id, token, settings)
        if status is None or STOP.requested.is_set():
            return  # requeued, or another attempt holds the job: as a job's process would end
        _free_device_memory()
        conn.send(("done", job_id))


def _free_device_memory() -> None:
    import gc

    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Runner:
    def __init__(
        self,
        settings: Settings,
        *,
        owner: str | None = None,
        devices: list[str | None] | None = None,
    ) -> None:
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.engine = make_engine(settings.db_url)
        side = {
            JobKind.ingest: settings.runner_ingest_slots,
            JobKind.distill: settings.runner_distill_slots,
        }
        device_kinds = DEVICE_KINDS + tuple(kind for kind, count in side.items() if not count)
        self.slots = [
            Slot(d, device_kinds)
            for d in (devices if devices is not None else detect_devices(settings))
        ] + [Slot(None, (kind,)) for kind, count in side.items() for _ in range(count)]
        self._lock = threading.Lock()
        self._context = multiprocessing.get_context("spawn")
        self._ended: list[Ended] = []
        self._db_away = False
        self.wake = threading.Event()  # set by the queue listener: claim now

    # One pass of each timer ----------------------------------------------------------------

    def poll(self) -> int:
        """Reap finished children and fill free slots; returns how many jobs started."""
        started = 0
        with self._lock:
            self._reap()
            for slot in self.slots:
                if slot.job_id is not None:
                    continue
                job = self._db_round(
                    "claiming a job",
                    lambda session, kinds=slot.kinds: claim_next_job(
                        session,
                        owner=self.owner,
                        lease_seconds=self.settings.runner_lease_seconds,
                        kinds=kinds,
                    ),
                )
                if job is None:
                    continue  # another slot may take another kind
                assert job.id is not None and job.lease_token is not None
                if self._warm(slot):
                    self._send_warm(slot, job)
                else:
                    self._stop_worker(slot)
                    process = self._context.Process(
                        target=_child_main,
                        args=(job.id, job.lease_token, slot.device, self.settings),
                        name=f"job-{job.id}",
                        daemon=False,
                    )
                    process.start()
                    slot.process = process
                slot.job_id, slot.token = job.id, job.lease_token
                started += 1
                assert slot.process is not None
                log.info("job %d started on %s (pid %s)", job.id, slot.name, slot.process.pid)
        return started

    def _warm(self, slot: Slot) -> bool:
        """Whether this slot runs its jobs in a warm worker."""
        mode = self.settings.runner_warm_worker
        if slot.name in SIDE_SLOTS.values() or mode == "off":
            return False
        return mode == "on" or slot.device is not None

    def _send_warm(self, slot: Slot, job: Job) -> None:
        """Hand ``job`` to the slot's warm worker: the live one when it has the job's base model
        resident, else a fresh one (a changed base model starts a fresh worker)."""
        alive = slot.process is not None and slot.process.is_alive()
        if not alive or slot.warm_key != job.base_model:
            self._stop_worker(slot)
            ours, theirs = self._context.Pipe()
            process = self._context.Process(
                target=_warm_main,
                args=(theirs, slot.device, self.settings),
                name=f"warm-{slot.name}",
                daemon=False,
            )
            process.start()
            theirs.close()
            slot.process, slot.conn, slot.warm_key = process, ours, job.base_model
            log.info("warm worker started on %s (pid %s)", slot.name, process.pid)
        assert slot.conn is not None
        slot.conn.send((job.id, job.lease_token))

    def _stop_worker(self, slot: Slot) -> None:
        """End an idle warm worker (its base model is not the one needed, or warm is off)."""
        if slot.process is not None and slot.process.is_alive():
            slot.process.terminate()
            slot.process.join(30)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
        if slot.conn is not None:
            slot.conn.close()
        slot.process, slot.conn, slot.warm_key = None, None, None

    def heartbeat(self) -> None:
        with self._lock:
            for slot in self.slots:
                if slot.process is None or slot.job_id is None or slot.token is None:
                    continue
                job_id, token = slot.job_id, slot.token
                held = self._db_round(
                    f"renewing the lease of job {job_id}",
                    lambda session, job_id=job_id, token=token: renew_lease(
                        session,
                        job_id=job_id,
                        token=token,
                        lease_seconds=self.settings.runner_lease_seconds,
                    ),
                    default=True,  # unknown while the database is away: keep the job running
                )
                if not held and slot.process.is_alive():
                    self._claim_gone(slot, job_id)

    def _claim_gone(self, slot: Slot, job_id: int) -> None:
        """The slot's claim no longer renews: the job ended (its process is exiting: let it) or
        another attempt holds it now (stop this one)."""
        job = self._db_round(
            f"reading job {job_id}", lambda session: session.get(Job, job_id), default=None
        )
        if job is not None and JobStatus(job.status).finished:
            return
        log.warning(
            "job %d was claimed again by another attempt: stopping this slot's process", job_id
        )
        assert slot.process is not None
        slot.process.terminate()

    def sweep(self) -> None:
        alive = [
            slot.token
            for slot in list(self.slots)
            if slot.token is not None and slot.process is not None and slot.process.is_alive()
        ]
        changed = self._db_round(
            "expiring leases",
            lambda session: expire_leases(
                session, max_attempts=self.settings.runner_max_attempts, alive=alive
            ),
            default=[],
        )
        for job_id, status in changed:
            log.warning("job %d: lease expired, now %s", job_id, status)
        self._record_ended()

    def finish_sweeps(self) -> None:
        """Draw and announce every sweep whose runs all ended, however they ended (trained,
        failed, cancelled while queued, expired): the first runner to see it does it once."""
        from runner.sweep import after_run
        from storage.artifacts import ArtifactStore
        from storage.sweeps import unfinished_sweeps_done

        done = self._db_round("finding ended sweeps", unfinished_sweeps_done, default=[])
        store = ArtifactStore(self.settings.artifact_dir)
        for sweep_id in done:
            self._db_round(
                f"finishing sweep {sweep_id}",
                lambda session, sweep_id=sweep_id: after_run(session, store, sweep_id=sweep_id),
                default=False,
            )

    def prune(self) -> None:
        from datetime import timedelta

        pruned = self._db_round(
            "pruning old events",
            lambda session: prune_history(
                session,
                job_events_older_than=timedelta(days=self.settings.job_event_retention_days),
                slack_events_older_than=timedelta(days=SLACK_EVENT_RETENTION_DAYS),
            ),
            default=(0, 0),
        )
        if any(pruned):
            log.info("pruned %d job events and %d Slack event ids past retention", *pruned)
        feedback = self._db_round(
            "pruning old feedback",
            lambda session: prune_feedback(
                session, older_than=timedelta(days=self.settings.feedback_retention_days)
            ),
            default=0,
        )
        if feedback:
            log.info("pruned %d feedback rows past FEEDBACK_RETENTION_DAYS", feedback)

    def _db_round(self, what: str, call: Any, default: Any = None) -> Any:
        """Run one timer's database work; a database that does not answer skips the round."""
        try:
            with new_session(self.engine) as session:
                result = call(session)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            if not self._db_away:
                log.warning("the database does not answer (%s): %s waits", type(exc).__name__, what)
            self._db_away = True
            return default
        if self._db_away:
            log.warning("the database answers again")
            self._db_away = False
        return result

    def _reap(self) -> None:
        for slot in self.slots:
            if slot.process is None:
                continue
            if slot.conn is not None and slot.job_id is not None and _done(slot.conn):
                assert slot.token is not None
                self._ended.append(Ended(slot.job_id, slot.token, 0))
                log.info("job %d ended in the warm worker", slot.job_id)
                slot.job_id, slot.token = None, None
                continue
            if slot.process.is_alive():
                continue
            slot.process.join()
            code = slot.process.exitcode
            if slot.job_id is not None and slot.token is not None:
                self._ended.append(Ended(slot.job_id, slot.token, code))
                log.info("job %d process ended (exit code %s)", slot.job_id, code)
            if slot.conn is not None:
                slot.conn.close()
            slot.process, slot.job_id, slot.token = None, None, None
            slot.conn, slot.warm_key = None, None
        self._record_ended()

    def _ended_now(self) -> bool:
        """A job's process ended, or a warm worker said its job did."""
        for slot in self.slots:
            if slot.process is not None and not slot.process.is_alive():
                return True
            if slot.conn is not None and slot.job_id is not None and slot.conn.poll():
                return True
        return False

    def _record_ended(self) -> None:
        """What ended children left to record: a requeue (exit EXIT_REQUEUE), or the failure of
        a process that died without ending its job. Kept until the database answers."""
        while self._ended:
            ended = self._ended[0]
            done = self._db_round(
                f"recording the end of job {ended.job_id}'s process",
                lambda session, ended=ended: _record_end(session, ended),
                default=False,
            )
            if not done:
                return
            self._ended.pop(0)

    def busy(self) -> bool:
        with self._lock:
            return any(slot.job_id is not None for slot in self.slots) or bool(self._ended)

    def queued(self) -> int:
        """Queued jobs a slot could claim now (a Slack job waiting for its thread is not)."""
        return len(
            self._db_round(
                "counting queued jobs",
                lambda session: session.exec(
                    select(Job.id).where(
                        Job.status == JobStatus.queued.value,
                        or_(col(Job.channel_id).is_(None), col(Job.thread_ts).is_not(None)),
                    )
                ).all(),
                default=[0],
            )
        )

    # The loop ------------------------------------------------------------------------------

    def run(self, *, once: bool = False, stop: threading.Event | None = None) -> None:
        """Serve the queue until ``stop`` is set; ``once``: until it is empty and idle."""
        stop = stop or threading.Event()
        lease = self.settings.runner_lease_seconds
        scheduler = BackgroundScheduler()
        scheduler.add_job(
            self.heartbeat,
            "interval",
            seconds=max(lease / 3, 0.2),
            id="heartbeat",
            max_instances=1,
            coalesce=True,
        )
        scheduler.add_job(
            self.sweep,
            "interval",
            seconds=max(lease / 2, 0.5),
            id="sweep",
            max_instances=1,
            coalesce=True,
        )
        scheduler.add_job(
            self.prune, "interval", hours=1, id="prune", max_instances=1, coalesce=True
        )
        scheduler.add_job(
            self.finish_sweeps,
            "interval",
            seconds=2,
            id="finish_sweeps",
            max_instances=1,
            coalesce=True,
        )
        log.info("runner %s serving %s", self.owner, ", ".join(s.name for s in self.slots))
        scheduler.start()
        listener = None
        if not once and listens(self.settings.db_url):
            listener = QueueListener(self.settings.db_url, self.wake, stop).start()
        try:
            if once:
                while not stop.is_set():
                    self.sweep()
                    self.poll()
                    if not self.busy() and self.queued() == 0:
                        self.finish_sweeps()
                        break
                    stop.wait(0.25)
            else:
                self._serve(stop)
        finally:
            self.wake.set()
            if listener is not None:
                listener.join(5)
            scheduler.shutdown(wait=True)
            self.shutdown()

    def _serve(self, stop: threading.Event) -> None:
        """Claim work when woken (a NOTIFY on PostgreSQL), when a slot's process ends (reaped at
        once), and every ``RUNNER_POLL_SECONDS`` in any case (the fallback, and SQLite's way)."""
        every = self.settings.runner_poll_seconds
        next_poll = 0.0
        while not stop.is_set():
            now = time.monotonic()
            ended = self._ended_now()
            if self.wake.is_set() or ended or now >= next_poll:
                self.wake.clear()
                self.poll()
                next_poll = now + every
            self.wake.wait(min(WAKE_CHECK_SECONDS, max(next_poll - time.monotonic(), 0.0)))

    def shutdown(self, grace_seconds: float = 30.0) -> None:
        """Stop children (SIGTERM: each saves a checkpoint and puts its job back in the queue,
        its attempt not counted) and requeue whatever a child could not hand back itself."""
        with self._lock:
            running = [s for s in self.slots if s.process is not None and s.process.is_alive()]
            for slot in running:
                assert slot.process is not None
                slot.process.terminate()
            deadline = time.monotonic() + grace_seconds
            for slot in running:
                assert slot.process is not None
                slot.process.join(timeout=max(deadline - time.monotonic(), 0.1))
                if slot.process.is_alive():
                    log.warning(
                        "job %s did not stop in %.0f s: killing it", slot.job_id, grace_seconds
                    )
                    slot.process.kill()
                    slot.process.join()
            for slot in self.slots:
                if slot.process is not None and slot.job_id is not None and slot.token is not None:
                    self._ended.append(Ended(slot.job_id, slot.token, EXIT_REQUEUE))
                if slot.conn is not None:
                    slot.conn.close()
                slot.process, slot.job_id, slot.token = None, None, None
                slot.conn, slot.warm_key = None, None
            self._record_ended()
            if self._ended:
                log.warning(
                    "the database does not answer: jobs %s stay leased to this runner and are "
                    "requeued when their leases run out",
                    ", ".join(str(e.job_id) for e in self._ended),
                )
        self.engine.dispose()


def _done(conn: Any) -> bool:
    """Read a warm worker's "job done" message if one is waiting."""
    try:
        return bool(conn.poll()) and conn.recv()[0] == "done"
    except (EOFError, OSError):
        return False


WAKE_CHECK_SECONDS = 0.1  # how often the loop looks for ended processes between polls
SLACK_EVENT_RETENTION_DAYS = 2  # Slack retries an event within minutes; a day's ids are plenty


def _record_end(session: Any, ended: Ended) -> bool:
    """Record what a child's end means for its job, under the child's claim; True when done."""
    if not holds_lease(session, job_id=ended.job_id, token=ended.token):
        return True  # the job ended itself, or another attempt holds it: nothing to record
    if ended.exitcode == EXIT_REQUEUE:
        requeue_job(
            session,
            job_id=ended.job_id,
            token=ended.token,
            reason="its runner was stopped or lost the database; it resumes from its last "
            "checkpoint",
            refund_attempt=True,
        )
        return True
    set_job_state(
        session,
        job_id=ended.job_id,
        token=ended.token,
        status=JobStatus.failed,
        error=exit_reason(ended.exitcode),
    )
    return True


def exit_reason(code: int | None) -> str:
    """Why a job's process ended without ending its job, in the words a user can act on.

    >>> exit_reason(-9).split(":")[0]
    'the training process was killed (SIGKILL)'
    >>> exit_reason(-15)
    "the training process was killed by SIGTERM; the runner's log has the details"
    >>> exit_reason(1)
    "the training process exited with code 1; the runner's log has the details"
    """
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else -code
        if code == -signal.SIGKILL:
            return (
                f"the training process was killed ({name}): most often the kernel ran out of host "
                'memory and killed it (check `dmesg` on the runner host for "Out of memory"); '
                "the runner's log has the details"
            )
        return f"the training process was killed by {name}; the runner's log has the details"
    return f"the training process exited with code {code}; the runner's log has the details"


TMP_MAX_AGE_S = 24 * 3600


def main_loop(settings: Settings, *, once: bool) -> int:
    from storage.artifacts import ArtifactStore

    # What a killed writer (a training checkpoint, an export) left under tmp/ a day ago is garbage;
    # younger entries may belong to another runner sharing ARTIFACT_DIR.
    swept = ArtifactStore(settings.artifact_dir).sweep_tmp(older_than=TMP_MAX_AGE_S)
    if swept:
        log.info("removed %d abandoned entries under %s/tmp", swept, settings.artifact_dir)
    runner = Runner(settings)
    stop = threading.Event()
    if not once:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    runner.run(once=once, stop=stop)
    log.info("runner stopped after %.1f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_loop(Settings(), once="--once" in sys.argv))
