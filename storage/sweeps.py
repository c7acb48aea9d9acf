"""Sweeps: training jobs over a grid of settings, queued in one transaction and compared as one.

A sweep's runs are ordinary jobs (``jobs.sweep_id``): runners claim them as any other, so they
spread over every free device. ``sweep_rows`` is the comparison table (each run's state, final
loss, accuracy, macro-F1, calibration, tokens/s), ``best_row`` the run to promote (macro-F1, then
accuracy, then the lower ECE, then the earlier run), ``finish_sweep`` the atomic "this caller saw
the last run end" that lets exactly one process draw the sweep's plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, update
from sqlmodel import Session, col, select

from core.enums import JobKind, JobStatus
from core.errors import Conflict, NotFound
from storage.evaluations import on_eval_sets
from storage.jobs import add_job_event, create_job, request_cancel
from storage.models import Checkpoint, Evaluation, Job, JobEvent, Sweep
from storage.types import utcnow

FINISHED = [s.value for s in JobStatus if s.finished]


def create_sweep(
    session: Session,
    *,
    base_model: str,
    dataset_id: int | None,
    grid: dict[str, list[Any]],
    fixed: dict[str, Any],
    runs: list[dict[str, Any]],
    requested_by: str | None = None,
    channel_id: str | None = None,
    thread_ts: str | None = None,
) -> tuple[Sweep, list[Job]]:
    """The sweep and one queued job per run config, all in one transaction: nothing is queued
    unless everything is."""
    sweep = Sweep(
        dataset_id=dataset_id,
        base_model=base_model,
        grid=grid,
        fixed=fixed,
        requested_by=requested_by,
        channel_id=channel_id,
        thread_ts=thread_ts,
    )
    try:
        session.add(sweep)
        session.flush()
        jobs = []
        for config in runs:
            job = create_job(
                session,
                base_model=base_model,
                config=config,
                dataset_id=dataset_id,
                kind=JobKind.train,
                requested_by=requested_by,
                channel_id=channel_id,
                thread_ts=thread_ts,
                commit=False,
            )
            job.sweep_id = sweep.id
            jobs.append(job)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return sweep, jobs


def get_sweep(session: Session, sweep_id: int, *, channel_id: str | None = None) -> Sweep:
    """The sweep, or NotFound; with ``channel_id``, only a sweep of that channel (channels see
    only their own)."""
    sweep = session.get(Sweep, sweep_id, populate_existing=True)
    if sweep is None or (channel_id is not None and sweep.channel_id != channel_id):
        raise NotFound(f"no sweep {sweep_id}")
    return sweep


def sweep_jobs(session: Session, sweep_id: int) -> list[Job]:
    return list(
        session.exec(select(Job).where(col(Job.sweep_id) == sweep_id).order_by(col(Job.id))).all()
    )


def set_sweep_thread(session: Session, *, sweep_id: int, thread_ts: str) -> None:
    """The sweep's thread root, and every run's thread: the runs report in the sweep's thread."""
    session.execute(update(Sweep).where(col(Sweep.id) == sweep_id).values(thread_ts=thread_ts))
    session.execute(update(Job).where(col(Job.sweep_id) == sweep_id).values(thread_ts=thread_ts))
    session.commit()


def cancel_sweep(session: Session, *, sweep_id: int, by: str | None = None) -> list[Job]:
    """Cancel every run that has not ended (queued ones at once, running ones within seconds);
    returns the runs it asked. A sweep whose runs all ended is a Conflict."""
    session.execute(update(Sweep).where(col(Sweep.id) == sweep_id).values(cancel_requested=True))
    session.commit()
    open_runs = [j for j in sweep_jobs(session, sweep_id) if not JobStatus(j.status).finished]
    if not open_runs:
        raise Conflict(f"every run of sweep {sweep_id} already ended")
    asked = []
    for job in open_runs:
        assert job.id is not None
        try:
            asked.append(request_cancel(session, job_id=job.id, by=by))
        except Conflict:  # it ended between the read and the cancel
            continue
    return asked


def finish_sweep(session: Session, *, sweep_id: int, commit: bool = True) -> bool:
    """Mark the sweep finished if every run ended and nobody marked it yet; True for the one
    caller whose update did it (an atomic update: two runners ending the last two runs at once
    cannot both win). ``commit=False`` leaves the commit to the caller, for the mark and its
    announcement in one transaction."""
    unfinished = exists().where(col(Job.sweep_id) == sweep_id, col(Job.status).not_in(FINISHED))
    result = session.execute(
        update(Sweep)
        .where(col(Sweep.id) == sweep_id, col(Sweep.finished_at).is_(None), ~unfinished)
        .values(finished_at=utcnow())
    )
    if commit:
        session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def unfinished_sweeps_done(session: Session) -> list[int]:
    """Sweeps not marked finished whose runs have all ended."""
    unfinished = exists().where(col(Job.sweep_id) == Sweep.id, col(Job.status).not_in(FINISHED))
    return [
        int(i)
        for i in session.exec(
            select(Sweep.id).where(col(Sweep.finished_at).is_(None), ~unfinished)
        ).all()
        if i is not None
    ]


@dataclass
class SweepRow:
    job_id: int
    settings: dict[str, Any]  # the swept settings' values of this run
    status: str
    final_loss: float | None = None
    tokens_per_s: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    ece: float | None = None
    checkpoint_id: int | None = None
    losses_sha256: str | None = None
    error: str | None = None

    @property
    def settings_text(self) -> str:
        """``lr=5e-5 epochs=2``: the run's swept settings as typed."""
        return " ".join(f"{k}={v}" for k, v in self.settings.items())


def sweep_rows(session: Session, sweep: Sweep) -> list[SweepRow]:
    """One row per run, in run order, from the runs' events and their final checkpoints'
    evaluations."""
    assert sweep.id is not None
    jobs = sweep_jobs(session, sweep.id)
    ids = [j.id for j in jobs]
    trained: dict[int, dict[str, Any]] = {}
    for event in session.exec(
        select(JobEvent)
        .where(col(JobEvent.job_id).in_(ids), col(JobEvent.kind) == "trained")
        .order_by(col(JobEvent.id))
    ).all():
        trained[event.job_id] = event.payload
    finals = {
        c.job_id: c
        for c in session.exec(
            select(Checkpoint).where(col(Checkpoint.job_id).in_(ids), col(Checkpoint.final))
        ).all()
    }
    evaluations: dict[int, dict[str, Any]] = {}
    checkpoint_ids = [c.id for c in finals.values()]
    for evaluation in session.exec(
        on_eval_sets(select(Evaluation))
        .where(col(Evaluation.checkpoint_id).in_(checkpoint_ids))
        .order_by(col(Evaluation.id))
    ).all():
        assert evaluation.checkpoint_id is not None
        evaluations[evaluation.checkpoint_id] = evaluation.metrics  # the newest wins
    rows = []
    for job in jobs:
        assert job.id is not None
        summary = trained.get(job.id, {})
        final = finals.get(job.id)
        metrics = evaluations.get(final.id, {}) if final and final.id else {}
        rows.append(
            SweepRow(
                job_id=job.id,
                settings={
                    key: _as_typed(job.config.get(key), values)
                    for key, values in sweep.grid.items()
                },
                status=job.status,
                final_loss=summary.get("final_loss"),
                tokens_per_s=summary.get("tokens_per_s"),
                accuracy=metrics.get("accuracy"),
                macro_f1=metrics.get("macro_f1"),
                ece=metrics.get("ece"),
                checkpoint_id=final.id if final else None,
                losses_sha256=summary.get("losses_sha256"),
                error=job.error,
            )
        )
    return rows


def _as_typed(value: Any, typed: list[Any]) -> Any:
    """The value as the sweep's author typed it (``5e-5``, not ``5e-05``), when one matches."""
    for candidate in typed:
        try:
            if float(candidate) == float(value):
                return candidate
        except (TypeError, ValueError):
            if str(candidate).lower() == str(value).lower():
                return candidate
    return value


def best_row(rows: list[SweepRow]) -> SweepRow | None:
    """The succeeded, evaluated run with the highest macro-F1 (then accuracy, then the lower
    ECE, then the earlier run); None while no run has one."""
    scored = [
        r
        for r in rows
        if r.status == JobStatus.succeeded.value
        and r.macro_f1 is not None
        and r.checkpoint_id is not None
    ]
    if not scored:
        return None
    return min(
        scored,
        key=lambda r: (
            -(r.macro_f1 or 0.0),
            -(r.accuracy or 0.0),
            r.ece if r.ece is not None else 1.0,
            r.job_id,
        ),
    )


def add_sweep_event(
    session: Session, *, sweep: Sweep, kind: str, commit: bool = True, **payload: Any
) -> None:
    """An event for the sweep's thread, on its first run's outbox (the notifier relays per job)."""
    assert sweep.id is not None
    first = session.exec(
        select(Job.id).where(col(Job.sweep_id) == sweep.id).order_by(col(Job.id))
    ).first()
    if first is None:
        raise NotFound(f"sweep {sweep.id} has no runs")
    add_job_event(session, job_id=first, kind=kind, sweep_id=sweep.id, **payload)
    if commit:
        session.commit()
