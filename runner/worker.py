"""The runner loop: claim queued jobs, run each in a child process pinned to one GPU
(``CUDA_VISIBLE_DEVICES``; one CPU slot when there is no GPU), renew their leases by heartbeat,
reap children, and requeue or fail jobs whose runner vanished. APScheduler drives the timers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlmodel import select

from core.enums import JobStatus
from core.settings import Settings
from storage.db import make_engine, new_session
from storage.jobs import add_job_event, claim_next_job, expire_leases, renew_lease, set_job_state
from storage.models import Job

log = logging.getLogger(__name__)


@dataclass
class Slot:
    device: str | None  # a CUDA device id, or None for the CPU
    process: BaseProcess | None = None
    job_id: int | None = None

    @property
    def name(self) -> str:
        return f"cuda:{self.device}" if self.device is not None else "cpu"


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


def _child_main(job_id: int, owner: str, device: str | None, settings: Settings) -> None:
    """Entry point of a job's process: pin the GPU before torch is imported, then run the job."""
    os.environ["CUDA_VISIBLE_DEVICES"] = device if device is not None else ""
    # Triton's compiled kernels (runner/train/kernels.py) kept with the artifacts: compiled once
    # per host (~2.5 s for a 7B's shapes), loaded in milliseconds by every later job.
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(settings.artifact_dir) / "cache" / "triton"))
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s job {job_id} %(levelname)s %(name)s: %(message)s"
    )
    from runner.job import run_job

    run_job(job_id, owner, settings)


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
        self.engine = make_engine(settings.database_url)
        self.slots = [
            Slot(d) for d in (devices if devices is not None else detect_devices(settings))
        ]
        self._lock = threading.Lock()
        self._context = multiprocessing.get_context("spawn")

    # One pass of each timer ----------------------------------------------------------------

    def poll(self) -> int:
        """Reap finished children and fill free slots; returns how many jobs started."""
        started = 0
        with self._lock:
            self._reap()
            for slot in self.slots:
                if slot.process is not None:
                    continue
                with new_session(self.engine) as session:
                    job = claim_next_job(
                        session, owner=self.owner, lease_seconds=self.settings.runner_lease_seconds
                    )
                if job is None:
                    break
                assert job.id is not None
                process = self._context.Process(
                    target=_child_main,
                    args=(job.id, self.owner, slot.device, self.settings),
                    name=f"job-{job.id}",
                    daemon=False,
                )
                process.start()
                slot.process, slot.job_id = process, job.id
                started += 1
                log.info("job %d started on %s (pid %s)", job.id, slot.name, process.pid)
        return started

    def heartbeat(self) -> None:
        with self._lock:
            for slot in self.slots:
                if slot.process is None or slot.job_id is None:
                    continue
                with new_session(self.engine) as session:
                    held = renew_lease(
                        session,
                        job_id=slot.job_id,
                        owner=self.owner,
                        lease_seconds=self.settings.runner_lease_seconds,
                    )
                if not held and slot.process.is_alive():
                    log.warning("lost the lease of job %d: stopping its process", slot.job_id)
                    slot.process.terminate()

    def sweep(self) -> None:
        with new_session(self.engine) as session:
            for job_id, status in expire_leases(
                session, max_attempts=self.settings.runner_max_attempts
            ):
                log.warning("job %d: lease expired, now %s", job_id, status)

    def _reap(self) -> None:
        for slot in self.slots:
            if slot.process is None or slot.process.is_alive():
                continue
            slot.process.join()
            code, job_id = slot.process.exitcode, slot.job_id
            slot.process, slot.job_id = None, None
            if job_id is None:
                continue
            with new_session(self.engine) as session:
                job = session.get(Job, job_id)
                if (
                    job is not None
                    and job.status in (JobStatus.running, JobStatus.evaluating)
                    and job.lease_owner == self.owner
                ):
                    reason = (
                        f"the training process was killed by signal {-code}"
                        if code and code < 0
                        else f"the training process exited with code {code}"
                    )
                    set_job_state(
                        session,
                        job_id=job_id,
                        owner=self.owner,
                        status=JobStatus.failed,
                        error=f"{reason} (out of host memory? the runner's log has the details)",
                    )
            log.info("job %d process ended (exit code %s)", job_id, code)

    def busy(self) -> bool:
        with self._lock:
            return any(slot.process is not None for slot in self.slots)

    def queued(self) -> int:
        with new_session(self.engine) as session:
            return len(
                session.exec(select(Job.id).where(Job.status == JobStatus.queued.value)).all()
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
        if not once:
            scheduler.add_job(
                self.poll,
                "interval",
                seconds=self.settings.runner_poll_seconds,
                id="poll",
                max_instances=1,
                coalesce=True,
            )
        log.info("runner %s serving %s", self.owner, ", ".join(s.name for s in self.slots))
        scheduler.start()
        try:
            if once:
                while not stop.is_set():
                    self.sweep()
                    self.poll()
                    if not self.busy() and self.queued() == 0:
                        break
                    stop.wait(0.25)
            else:
                self.poll()
                stop.wait()
        finally:
            scheduler.shutdown(wait=True)
            self.shutdown()

    def shutdown(self) -> None:
        """Stop children and hand their jobs back to the queue (they resume elsewhere)."""
        with self._lock:
            for slot in self.slots:
                if slot.process is None or slot.job_id is None:
                    continue
                if slot.process.is_alive():
                    slot.process.terminate()
                    slot.process.join(timeout=30)
                with new_session(self.engine) as session:
                    job = session.get(Job, slot.job_id)
                    if (
                        job is not None
                        and job.lease_owner == self.owner
                        and job.status in (JobStatus.running, JobStatus.evaluating)
                    ):
                        job.status, job.lease_owner, job.lease_expires_at = "queued", None, None
                        session.add(job)
                        add_job_event(
                            session,
                            job_id=slot.job_id,
                            kind="requeued",
                            reason="its runner was stopped; it resumes from its last checkpoint",
                        )
                        session.commit()
                slot.process, slot.job_id = None, None
        self.engine.dispose()


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
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    runner.run(once=once, stop=stop)
    log.info("runner stopped after %.1f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_loop(Settings(), once="--once" in sys.argv))
