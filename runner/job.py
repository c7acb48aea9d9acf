"""Execute one claimed training job, inside the child process a runner started for it.

It turns a job row into a ``TrainSpec`` (dataset rendered by the shared protocol, the base model
resolved, the last checkpoint to resume from), runs the recipe with hooks that write progress to
the outbox, honour cancel and register checkpoints, and ends the job: succeeded, cancelled or failed
with a message the user can act on. Every write checks the runner still holds the job's lease.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.enums import JobKind, JobStatus
from core.errors import FinetuneError
from core.protocol import PROTOCOL_VERSION, render_training_example
from core.settings import Settings
from runner.config import build_train_config
from runner.datasets.ingest import read_split
from runner.models import load_tokenizer, model_dir_for
from runner.train.recipe import TrainHooks, TrainingFailed, TrainSpec, train
from storage.artifacts import ArtifactStore
from storage.db import make_engine, new_session
from storage.jobs import (
    add_checkpoint,
    add_job_event,
    cancel_requested,
    latest_checkpoint,
    record_progress,
    set_job_state,
)
from storage.models import Dataset, Job

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 1.0


def run_job(job_id: int, owner: str, settings: Settings) -> JobStatus:
    """Run job ``job_id`` to its end; returns the state it ended in."""
    engine = make_engine(settings.database_url)
    store = ArtifactStore(settings.artifact_dir)
    try:
        with new_session(engine) as session:
            return _run(session, store, settings, job_id, owner)
    finally:
        engine.dispose()


def _run(
    session: Any, store: ArtifactStore, settings: Settings, job_id: int, owner: str
) -> JobStatus:
    job = session.get(Job, job_id)
    assert job is not None and job.id is not None
    if job.kind == JobKind.export.value:
        return _run_export(session, store, settings, job, owner)
    try:
        spec, dataset = _prepare(session, store, settings, job, owner)
        result = train(spec, _hooks(session, store, job, owner))
    except Exception as exc:
        return _fail(session, job_id, owner, exc)
    curve = store.put_bytes(_loss_curve(result.losses, job_id))
    summary: dict[str, Any] = {
        "steps": result.step,
        "total_steps": result.total_steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_second, 1),
        "loss_curve_sha256": curve.sha256,
        "dataset": dataset.name,
    }
    if result.status == "stopped":
        set_job_state(
            session,
            job_id=job_id,
            owner=owner,
            status=JobStatus.cancelled,
            reason="cancelled on request; its last checkpoint is kept",
            **summary,
        )
        return JobStatus.cancelled
    if not set_job_state(
        session, job_id=job_id, owner=owner, status=JobStatus.evaluating, event="trained", **summary
    ):
        return JobStatus.failed  # the lease was lost: another runner owns the job now
    try:
        summary["evaluation"] = _evaluate(session, store, settings, job, dataset)
    except Exception as exc:
        message = exc.message if isinstance(exc, FinetuneError) else type(exc).__name__
        log.exception("job %d: evaluation failed", job_id)
        set_job_state(
            session,
            job_id=job_id,
            owner=owner,
            status=JobStatus.failed,
            error=f"training finished and its checkpoint is kept, but the evaluation "
            f"failed: {message}",
        )
        return JobStatus.failed
    set_job_state(session, job_id=job_id, owner=owner, status=JobStatus.succeeded, **summary)
    return JobStatus.succeeded


def _fail(session: Any, job_id: int, owner: str, exc: Exception) -> JobStatus:
    """End the job ``failed``: a ``FinetuneError``'s message is for the user as it stands; any
    other error is logged with an id the user is shown instead of its details."""
    if isinstance(exc, FinetuneError):
        error = exc.message
    else:
        error_id = uuid.uuid4().hex[:8]
        log.exception("job %d failed with an internal error (error id %s)", job_id, error_id)
        error = f"internal error (error id {error_id}; the runner's log has the details)"
    set_job_state(session, job_id=job_id, owner=owner, status=JobStatus.failed, error=error)
    return JobStatus.failed


def _run_export(
    session: Any, store: ArtifactStore, settings: Settings, job: Job, owner: str
) -> JobStatus:
    """An export job: merge, quantize if asked, verify, publish (runner/export.py)."""
    from runner.export import export_checkpoint

    assert job.id is not None
    job_id = job.id
    config = job.config or {}

    def status(message: str) -> None:
        add_job_event(session, job_id=job_id, kind="status", message=message)
        session.commit()

    try:
        report = export_checkpoint(
            session,
            store,
            settings,
            checkpoint_id=int(config["checkpoint_id"]),
            bits=config.get("bits"),
            shard_size=config.get("shard_size", "5GB"),
            on_status=status,
        )
    except Exception as exc:
        return _fail(session, job_id, owner, exc)
    set_job_state(
        session,
        job_id=job_id,
        owner=owner,
        status=JobStatus.succeeded,
        event="exported",
        path=report["path"],
        absolute_path=str(store.path(report["path"])),
        bytes=report["bytes"],
        bits=report["export"]["bits"],
        checkpoint_id=report["checkpoint_id"],
        verification=report["verification"],
    )
    return JobStatus.succeeded


def _evaluate(
    session: Any, store: ArtifactStore, settings: Settings, job: Job, dataset: Dataset
) -> dict[str, Any] | None:
    """Score the final checkpoint on the eval split (and the base model once per eval set)."""
    import gc

    from runner.eval.metrics import HEADLINE_KEYS
    from runner.eval.report import ensure_base_evaluation, evaluate_model

    assert job.id is not None
    gc.collect()
    _release_gpu_memory()
    if dataset.eval_sha256 is None:
        add_job_event(
            session,
            job_id=job.id,
            kind="evaluation_skipped",
            reason="the dataset has no eval split",
        )
        session.commit()
        return None
    checkpoint = latest_checkpoint(session, job_id=job.id)
    assert checkpoint is not None and checkpoint.final
    base = ensure_base_evaluation(
        session, store, settings, dataset=dataset, base_model=job.base_model
    )
    evaluation = evaluate_model(
        session, store, settings, dataset=dataset, base_model=job.base_model, checkpoint=checkpoint
    )
    metrics = evaluation.metrics
    payload = {
        "evaluation_id": evaluation.id,
        "base_evaluation_id": base.id,
        "checkpoint_id": checkpoint.id,
        "report_path": evaluation.report_path,
        **{key: metrics.get(key) for key in HEADLINE_KEYS},
        "vs_base": metrics.get("vs_base"),
        "vs_promoted": metrics.get("vs_promoted"),
        "backend": metrics.get("backend"),
        "samples_per_second": metrics.get("predict_samples_per_second"),
    }
    add_job_event(session, job_id=job.id, kind="evaluated", **payload)
    session.commit()
    return payload


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _loss_curve(losses: list[float], job_id: int) -> bytes:
    from runner.plots import loss_curve_png

    return loss_curve_png(losses, title=f"job {job_id}: training loss")


def _prepare(
    session: Any, store: ArtifactStore, settings: Settings, job: Job, owner: str
) -> tuple[TrainSpec, Dataset]:
    assert job.id is not None
    config = build_train_config(job.config)
    dataset = session.get(Dataset, job.dataset_id) if job.dataset_id is not None else None
    if dataset is None:
        raise TrainingFailed(f"job {job.id} has no dataset (dataset id {job.dataset_id})")

    job_id = job.id

    def status(message: str) -> None:
        add_job_event(session, job_id=job_id, kind="status", message=message)
        session.commit()

    model_dir = model_dir_for(settings, job.base_model, on_status=status)
    assert model_dir is not None
    tokenizer = load_tokenizer(model_dir)
    conversations = read_split(store, dataset.train_sha256)
    examples = [render_training_example(tokenizer, c) for c in conversations]
    resume = latest_checkpoint(session, job_id=job.id)
    resume_path = store.path(resume.path) if resume is not None else None
    add_job_event(
        session,
        job_id=job.id,
        kind="started",
        attempt=job.attempts,
        owner=owner,
        samples=len(examples),
        resumed_from_step=resume.step if resume is not None else None,
    )
    session.commit()
    meta = {
        "protocol_version": PROTOCOL_VERSION,
        "base_model": job.base_model,
        "method": config.method,
        "adapter": config.method in ("lora", "qlora"),
        "labels": dataset.labels,
        "prompt_frame": dataset.prompt_frame,
        "dataset": {"id": dataset.id, "name": dataset.name, "version": dataset.version},
        "job_id": job.id,
    }
    spec = TrainSpec(
        config=config,
        examples=examples,
        base=model_dir,
        meta=meta,
        resume_from=resume_path,
        token_budget=settings.runner_token_budget,
        compile_layers=settings.runner_compile,
        cuda_graphs=settings.runner_cuda_graphs,
    )
    _check_memory(spec)
    return spec, dataset


def _check_memory(spec: TrainSpec) -> None:
    """Refuse a job that cannot fit on this GPU, or turn on gradient checkpointing if that fits."""
    import torch

    if not torch.cuda.is_available():
        return
    from transformers import AutoConfig

    from runner.train.memory import estimate_training_memory

    model_config = AutoConfig.from_pretrained(str(spec.base))
    config = spec.config
    lengths = sorted(
        (min(len(e.input_ids), config.cutoff_len) for e in spec.examples), reverse=True
    )[: config.samples_per_step]
    step_tokens = min(sum(lengths), max(spec.token_budget, lengths[0]))
    answers = sum(min(e.answer_len, config.cutoff_len) for e in spec.examples[: len(lengths)])
    free, _ = torch.cuda.mem_get_info()
    usable = int(free * 0.95)
    plain = estimate_training_memory(
        model_config, config, step_tokens=step_tokens, answer_tokens=answers
    )
    if plain.total <= usable:
        return
    checkpointed = estimate_training_memory(
        model_config,
        config,
        step_tokens=step_tokens,
        answer_tokens=answers,
        gradient_checkpointing=True,
    )
    if checkpointed.total <= usable:
        log.info(
            "turning on gradient checkpointing: %s needed without it, %.1f GiB free",
            plain.describe(),
            free / 2**30,
        )
        spec.gradient_checkpointing = True
        return
    raise TrainingFailed(
        f"this job needs {checkpointed.describe()} even with gradient checkpointing, and the GPU "
        f"has {free / 2**30:.1f} GiB free: lower cutoff_len or batch_size × grad_accum, or use "
        "method=qlora"
    )


def _hooks(session: Any, store: ArtifactStore, job: Job, owner: str) -> TrainHooks:
    assert job.id is not None
    job_id = job.id
    last_poll = [0.0]

    def on_progress(progress: dict[str, Any]) -> bool:
        return record_progress(session, job_id=job_id, owner=owner, progress=progress)

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last_poll[0] < CANCEL_POLL_SECONDS:
            return False
        last_poll[0] = now
        return cancel_requested(session, job_id=job_id)

    def relpath(step: int) -> str:
        return f"checkpoints/job-{job_id}/step-{step:06d}-attempt-{job.attempts}"

    @contextmanager
    def checkpoint_dir(step: int, final: bool) -> Iterator[Path]:
        with store.staged_dir(relpath(step)) as directory:
            yield directory

    def on_checkpoint(step: int, final: bool, directory: Path) -> None:
        import json

        meta = json.loads((store.path(relpath(step)) / "meta.json").read_text())
        add_checkpoint(
            session,
            job_id=job_id,
            owner=owner,
            step=step,
            final=final,
            path=relpath(step),
            base_model=job.base_model,
            meta=meta,
        )

    return TrainHooks(
        on_progress=on_progress,
        should_stop=should_stop,
        checkpoint_dir=checkpoint_dir,
        on_checkpoint=on_checkpoint,
    )
