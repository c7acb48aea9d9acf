"""A dataset check: the job a file shared in Slack becomes. The bot only downloads the file (into
``ARTIFACT_DIR/uploads/…``) and queues this job; a runner's dataset-check slot validates it and
stores it with the same code as ``python -m runner ingest``, in a process of its own (no GPU, no
torch), and the report reaches the job's thread through the outbox.

Config: ``upload`` (the upload's folder under ARTIFACT_DIR, holding the one file), ``filename``,
``name`` (the dataset name, from the file name) and optionally ``then_train`` (the settings of a
training job to queue on the stored dataset: the start form with a file).

Events: ``ingested`` (the dataset, the rendered validation report, and ``then_job_id`` when a
training job was queued: the notifier posts its root message) or ``dataset_rejected`` (the
problems, each located). Nothing is stored for a rejected file; the upload itself is deleted
either way.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from sqlmodel import Session

from core.enums import JobStatus
from core.errors import DatasetRejected, FinetuneError
from core.settings import Settings
from runner.jobdb import JobDb, fenced
from storage.artifacts import ArtifactStore
from storage.jobs import create_job, set_job_state
from storage.models import Dataset, Job

log = logging.getLogger(__name__)


def run_ingest(db: JobDb, store: ArtifactStore, settings: Settings, job: Job) -> JobStatus:
    from runner.datasets.ingest import IngestOptions, ingest_dataset
    from runner.datasets.report import render_report

    config = job.config or {}
    filename = str(config.get("filename") or "upload")
    upload = store.path(str(config["upload"]))
    path = upload / filename
    try:
        if not path.is_file():
            raise FinetuneError(
                f"the uploaded `{filename}` is no longer on the runner's disk ({upload}): share "
                "it again"
            )
        tokenizer, note = _tokenizer(settings, job.base_model)

        def ingest(session: Session) -> tuple[Dataset, dict[str, Any], int | None]:
            dataset, report = ingest_dataset(
                session,
                store,
                path,
                IngestOptions.from_settings(settings),
                name=str(config["name"]),
                tokenizer=tokenizer,
                tokenizer_note=note,
                channel_id=job.channel_id,
                uploaded_by=job.requested_by,
                commit=False,  # one transaction with the job's end: a retry stores it once
            )
            then = config.get("then_train")
            queued = None
            if then is not None:  # the start form with a file: train on it (its root: notifier)
                queued = create_job(
                    session,
                    base_model=job.base_model,
                    config=dict(then),
                    dataset_id=dataset.id,
                    requested_by=job.requested_by,
                    channel_id=job.channel_id,
                    commit=False,
                ).id
            fenced(
                set_job_state(
                    session,
                    job_id=db.job_id,
                    token=db.token,
                    status=JobStatus.succeeded,
                    event="ingested",
                    filename=filename,
                    dataset=describe_dataset(dataset),
                    report_text=render_report(report),
                    then_job_id=queued,
                )
            )
            return dataset, report, queued

        dataset, _, queued = db.wait(ingest)
    except DatasetRejected as exc:
        _end(db, JobStatus.failed, event="dataset_rejected", filename=filename, error=exc.message)
        return JobStatus.failed
    except FinetuneError as exc:
        _end(db, JobStatus.failed, filename=filename, error=exc.message)
        return JobStatus.failed
    finally:
        shutil.rmtree(upload, ignore_errors=True)
    log.info(
        "job %d: stored dataset %s v%d from %s%s",
        db.job_id,
        dataset.name,
        dataset.version,
        filename,
        f"; queued training job {queued}" if queued else "",
    )
    return JobStatus.succeeded


def _end(db: JobDb, status: JobStatus, **fields: Any) -> None:
    db.wait(lambda s: set_job_state(s, job_id=db.job_id, token=db.token, status=status, **fields))


def describe_dataset(dataset: Dataset) -> dict[str, Any]:
    return {
        "id": dataset.id,
        "name": dataset.name,
        "version": dataset.version,
        "train_samples": dataset.train_samples,
        "eval_samples": dataset.eval_samples,
        "labels": len(dataset.labels) if dataset.labels else None,
        "format": dataset.format,
        "kind": dataset.kind,
    }


def _tokenizer(settings: Settings, base_model: str) -> tuple[Any, str]:
    """The base model's tokenizer for the report's token counts (without torch), or None with
    why not: a hub model not downloaded yet is not fetched for a report."""
    from runner.models import load_fast_tokenizer, model_dir_for

    try:
        path = model_dir_for(settings, base_model, download=False)
    except FinetuneError as exc:
        return None, f"not measured: {exc.message}"
    if path is None:
        return None, f"not measured: {base_model} is not on this runner yet"
    return load_fast_tokenizer(path), f"tokenizer of {path.name}"
