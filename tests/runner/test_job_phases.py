"""Cancel between the phases of an evaluation and of an export, and the evaluate job that re-runs
a checkpoint's evaluation (after one failed): the runner's own job code on the tiny model."""

from __future__ import annotations

from sqlmodel import select

from core.enums import JobKind, JobStatus
from runner.export import export_name
from runner.job import run_job
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import claim_next_job, create_job, job_events, request_cancel
from storage.models import Evaluation, Job


def _run(engine, settings, kind: JobKind, config: dict, *, cancel: bool = False) -> Job:
    """Queue a job, claim it as a runner does, optionally ask to cancel it once it is running,
    then run it with the runner's code."""
    with new_session(engine) as session:
        job = create_job(session, kind=kind, base_model=settings.base_model, config=config)
        token = claim_next_job(session, owner="inline", lease_seconds=60).lease_token
        if cancel:
            request_cancel(session, job_id=job.id, by="U0USER")
    run_job(job.id, token, settings)
    with new_session(engine) as session:
        return session.get(Job, job.id)


def _kinds(engine, job_id: int) -> list[str]:
    with new_session(engine) as session:
        return [e.kind for e in job_events(session, job_id=job_id)]


def test_an_evaluate_job_scores_a_checkpoint_again_and_reports_it(
    engine, eval_settings, checkpoint
) -> None:
    job = _run(engine, eval_settings, JobKind.evaluate, {"checkpoint_id": checkpoint.id})
    assert job.status == JobStatus.succeeded, job.error
    with new_session(engine) as session:
        events = job_events(session, job_id=job.id)
        scored = session.exec(
            select(Evaluation).where(Evaluation.checkpoint_id == checkpoint.id)
        ).all()
    [report] = [e.payload for e in events if e.kind == "evaluated"]
    assert report["checkpoint_id"] == checkpoint.id and report["accuracy"] is not None
    assert len(scored) == 2  # the training job's evaluation and this one
    assert [e.kind for e in events][-1] == "succeeded"


def test_an_evaluate_job_of_a_checkpoint_that_is_gone_fails_saying_so(engine, eval_settings):
    job = _run(engine, eval_settings, JobKind.evaluate, {"checkpoint_id": 999})
    assert job.status == JobStatus.failed and "checkpoint 999 no longer exists" in job.error


def test_cancel_during_an_evaluation_ends_it_cancelled_without_a_report(
    engine, eval_settings, checkpoint
) -> None:
    job = _run(
        engine, eval_settings, JobKind.evaluate, {"checkpoint_id": checkpoint.id}, cancel=True
    )
    assert job.status == JobStatus.cancelled
    kinds = _kinds(engine, job.id)
    assert "evaluated" not in kinds and kinds[-1] == "cancelled"  # no Approve button


def test_cancel_during_an_export_publishes_nothing(engine, eval_settings, checkpoint) -> None:
    job = _run(engine, eval_settings, JobKind.export, {"checkpoint_id": checkpoint.id}, cancel=True)
    assert job.status == JobStatus.cancelled
    with new_session(engine) as session:
        [ended] = [e for e in job_events(session, job_id=job.id) if e.kind == "cancelled"]
    assert "nothing was published" in ended.payload["reason"]
    store = ArtifactStore(eval_settings.artifact_dir)
    assert not store.path(export_name(checkpoint.id, None)).exists()
    assert "exported" not in _kinds(engine, job.id)
