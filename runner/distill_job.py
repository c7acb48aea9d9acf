"""A distillation job: ``/finetune distill dataset=RAW teacher=URL model=NAME`` queued in Slack and
run by a runner's distill slot (``RUNNER_DISTILL_SLOTS``: a process of its own, no GPU) with the
same code as ``python -m runner distill`` (runner/distill.py).

Config: ``teacher`` (the API base URL, checked again here against the deployment's allowed
teachers before any sample leaves: runner/teachers.py), ``model``, ``tries`` and optionally
``name`` (the new dataset's). The teacher's key is the runner's setting, never the job's.

Events: ``distill_started`` (samples, how many the journal already holds), ``distill_progress``
(done / kept, at most every ``PROGRESS_SECONDS``; the header shows it), then ``distilled`` (the
new dataset, yield per label, tokens, rejected samples) or ``failed`` naming the cause (the
teacher unreachable, timed out, an HTTP status) and that the same command resumes: every
finished sample is in the journal, so a retry (the same command, or the runner requeueing the
job after a crash) asks only what is left.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from core.enums import JobStatus
from core.errors import FinetuneError, NotFound
from core.settings import Settings
from runner.jobdb import JobDb, fenced
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import cancel_requested, record_progress, set_job_state
from storage.models import Dataset, Job

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 2.0  # the header's refresh while samples finish (the notifier coalesces)


def resume_command(job: Job, source: Dataset) -> str:
    """The Slack command that resumes (or repeats) this distillation."""
    config = job.config or {}
    words = [
        f"dataset={source.name}",
        f"teacher={config.get('teacher')}",
        f"model={config.get('model')}",
        *(f"{key}={config[key]}" for key in ("tries", "name") if config.get(key)),
    ]
    return "`/finetune distill " + " ".join(words) + "`"


def failure_text(exc: Any, job: Job, source: Dataset, settings: Settings) -> str:
    """A teacher failure as the thread says it: the cause in words, what is kept, how to go on."""
    url = (job.config or {}).get("teacher")
    cause = {
        "unreachable": "is unreachable",
        "timed out": f"timed out (no answer within DISTILL_TIMEOUT_SECONDS, "
        f"{settings.distill_timeout_seconds:g} s)",
    }.get(exc.cause, f"failed ({exc.cause})" if exc.cause else "failed")
    return (
        f"the teacher at {url} {cause}. {exc.done} of {exc.total} samples are done and kept; "
        f"the same command resumes with the rest: {resume_command(job, source)}"
    )


class _Progress:
    """``on_sample`` and ``stopping`` for one attempt: progress written at most every
    PROGRESS_SECONDS (tried once: a database away loses a header refresh, not a sample), cancel
    polled at most once a second, the runner's SIGTERM seen at once."""

    def __init__(self, db: JobDb) -> None:
        self.db = db
        self.lock = threading.Lock()
        self.written_at = 0.0
        self.polled_at = 0.0
        self.cancelled = False

    def on_sample(self, done: int, kept: int, total: int) -> None:
        now = time.monotonic()
        if now - self.written_at < PROGRESS_SECONDS and done < total:
            return
        self.written_at = now
        progress = {"done": done, "kept": kept, "samples": total}
        ok, go_on = self.db.try_once(
            lambda s: record_progress(
                s,
                job_id=self.db.job_id,
                token=self.db.token,
                progress=progress,
                event="distill_progress",
            )
        )
        if ok and not go_on:
            self.cancelled = True

    def stopping(self) -> bool:
        from runner.job import STOP

        with self.lock:
            now = time.monotonic()
            if not self.cancelled and now - self.polled_at >= 1.0:
                self.polled_at = now
                ok, asked = self.db.try_once(lambda s: cancel_requested(s, job_id=self.db.job_id))
                self.cancelled = bool(ok and asked)
        return self.cancelled or STOP.requested.is_set()


def run_distill(db: JobDb, store: ArtifactStore, settings: Settings, job: Job) -> JobStatus:
    from runner.distill import (
        DistillLimits,
        DistillStopped,
        Teacher,
        TeacherFailed,
        distill_dataset,
        journal_path,
        read_journal,
    )
    from runner.ingest_job import describe_dataset
    from runner.teachers import check_teacher, teacher_api_key

    config = job.config or {}
    source = db.wait(lambda s: s.get(Dataset, job.dataset_id)) if job.dataset_id else None
    try:
        if source is None:
            raise NotFound(f"its source dataset (id {job.dataset_id}) is gone")
        url = check_teacher(str(config.get("teacher", "")), settings)
        teacher = Teacher(
            url,
            str(config.get("model")),
            api_key=teacher_api_key(url, settings),
            timeout_s=settings.distill_timeout_seconds,
        )
        limits = DistillLimits(
            tries=int(config.get("tries", 3)),
            concurrency=settings.distill_concurrency,
            requests_per_second=settings.distill_requests_per_second,
        )
        journal = journal_path(store.root, source.train_sha256, teacher, list(source.labels or []))
        fenced(
            db.wait(
                lambda s: set_job_state(
                    s,
                    job_id=db.job_id,
                    token=db.token,
                    status=JobStatus.running,
                    event="distill_started",
                    source={"name": source.name, "version": source.version},
                    samples=source.train_samples,
                    done=len(read_journal(journal)),
                    teacher=url,
                    model=teacher.model,
                    tries=limits.tries,
                    attempt=job.attempts,
                )
            )
        )
        progress = _Progress(db)
        with new_session(db.engine) as session:
            stored, summary = distill_dataset(
                session,
                store,
                settings,
                dataset=source,
                teacher=teacher,
                limits=limits,
                name=config.get("name"),
                on_sample=progress.on_sample,
                stopping=progress.stopping,
                channel_id=job.channel_id,
                uploaded_by=job.requested_by or "distill",
            )
            described = describe_dataset(stored)
    except TeacherFailed as exc:
        assert source is not None
        _end(db, JobStatus.failed, error=failure_text(exc, job, source, settings))
        return JobStatus.failed
    except DistillStopped as exc:
        assert source is not None
        if not progress.cancelled:  # the runner is stopping: SIGTERM's requeue takes it
            from runner.job import Stopping

            raise Stopping() from exc
        reason = (
            f"{exc.done} of {exc.total} samples are done and kept; "
            f"{resume_command(job, source)} resumes"
        )
        _end(db, JobStatus.cancelled, reason=reason)
        return JobStatus.cancelled
    except FinetuneError as exc:
        _end(db, JobStatus.failed, error=exc.message)
        return JobStatus.failed
    rejected = summary["samples"] - summary["kept"]
    _end(
        db,
        JobStatus.succeeded,
        event="distilled",
        dataset=described,
        rejected=rejected,
        **{
            key: summary[key]
            for key in (
                "samples",
                "kept",
                "yield",
                "per_label",
                "teacher_requests",
                "tokens",
                "asked_now",
                "tokens_now",
            )
        },
        tries=limits.tries,
    )
    log.info(
        "job %d: stored dataset %s v%d: %d of %d samples kept, %d tokens",
        db.job_id,
        stored.name,
        stored.version,
        summary["kept"],
        summary["samples"],
        summary["tokens"],
    )
    return JobStatus.succeeded


def _end(db: JobDb, status: JobStatus, **fields: Any) -> None:
    fenced(
        db.wait(
            lambda s: set_job_state(s, job_id=db.job_id, token=db.token, status=status, **fields)
        )
    )
