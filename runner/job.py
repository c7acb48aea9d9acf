"""Execute one claimed job, inside the child process a runner started for it.

A training job becomes a ``TrainSpec`` (dataset rendered by the shared protocol, the base model
resolved, the last checkpoint to resume from) and runs the recipe with hooks that write progress to
the outbox, honour cancel and register checkpoints; then the final checkpoint is evaluated and the
job ends succeeded, cancelled or failed with a message the user can act on. Export and evaluate
jobs run their one phase. Every write is fenced by the attempt's claim token and survives a
database outage (runner/jobdb.py).

Stopping: cancel is checked during training (within a second), between evaluation phases and
between export phases; a job cancelled before its evaluation was reported ends ``cancelled``
without an Approve button. SIGTERM (the runner shutting down) makes the training loop save a
checkpoint and the job go back to the queue, its attempt not counted; during evaluation or export
it interrupts the phase and requeues the job the same way.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlmodel import Session

from core.enums import JobKind, JobStatus
from core.errors import ConfigError, FinetuneError, NotFound
from core.label_scoring import answer_style
from core.protocol import PROTOCOL_VERSION, answer_of, render_training_example
from core.settings import Settings
from runner.config import build_train_config
from runner.datasets.ingest import read_documents, read_split
from runner.jobdb import ClaimLost, DatabaseAway, JobDb, fenced
from runner.models import base_model_build, load_tokenizer, model_dir_for
from storage.artifacts import ArtifactStore
from storage.datasets import stage_problem
from storage.db import make_engine
from storage.jobs import (
    add_checkpoint,
    add_job_event,
    cancel_requested,
    holds_lease,
    job_checkpoints,
    latest_checkpoint,
    record_progress,
    requeue_job,
    set_job_state,
)
from storage.models import Checkpoint, Dataset, Job

if TYPE_CHECKING:  # the recipe imports torch: a dataset check's process does without
    from runner.train.recipe import TrainHooks, TrainSpec

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 1.0


class Stopping(BaseException):
    """SIGTERM arrived outside the training loop: end the phase now, the job goes back to the
    queue. A BaseException so that no ``except Exception`` on the way turns it into a failure."""


class Cancelled(Exception):
    """Cancel was requested; raised between phases."""


class _StopSignal:
    """SIGTERM in a job process. In the training loop it only sets a flag (the loop saves a
    checkpoint and returns); in another phase of the job it raises ``Stopping``; once the job is
    over (the process is exiting) it changes nothing."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.in_training_loop = False
        self.in_job = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested.set()
        if self.in_job and not self.in_training_loop:
            raise Stopping()


STOP = _StopSignal()


def run_job(job_id: int, token: str, settings: Settings) -> JobStatus | None:
    """Run job ``job_id`` under the claim ``token`` to its end; returns the state it ended in, or
    None when this attempt did not end it (it was requeued, or another attempt holds it now).
    Raises DatabaseAway when the database stayed unreachable (the caller asks for a requeue)."""
    db = JobDb(
        make_engine(settings.db_url),
        job_id=job_id,
        token=token,
        outage_seconds=settings.runner_lease_seconds,
    )
    store = ArtifactStore(settings.artifact_dir)
    STOP.in_job = True
    try:
        job = db.wait(lambda session: session.get(Job, job_id))
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.kind == JobKind.export.value:
            return _run_export(db, store, settings, job)
        if job.kind == JobKind.evaluate.value:
            return _run_evaluate(db, store, settings, job)
        if job.kind == JobKind.ingest.value:
            from runner.ingest_job import run_ingest

            return run_ingest(db, store, settings, job)
        if job.kind == JobKind.distill.value:
            from runner.distill_job import run_distill

            return run_distill(db, store, settings, job)
        return _run_training(db, store, settings, job)
    except ClaimLost:
        log.warning("job %d: another attempt holds the job now; this one stops", job_id)
        return None
    except Stopping:
        STOP.in_job = False
        _requeue(db, "its runner was stopped; it resumes from its last checkpoint")
        return None
    finally:
        STOP.in_job = False
        db.dispose()


def _requeue(db: JobDb, reason: str) -> None:
    done = db.wait(
        lambda s: requeue_job(
            s, job_id=db.job_id, token=db.token, reason=reason, refund_attempt=True
        )
    )
    log.info("job %d: %s", db.job_id, reason if done else "already ended or taken over")


def _state(db: JobDb, status: JobStatus, **fields: Any) -> bool:
    return bool(
        db.wait(
            lambda s: set_job_state(s, job_id=db.job_id, token=db.token, status=status, **fields)
        )
    )


def _event(db: JobDb, kind: str, **payload: Any) -> None:
    def write(session: Session) -> None:
        if not holds_lease(session, job_id=db.job_id, token=db.token):
            raise ClaimLost("this attempt's claim on the job was taken over")
        add_job_event(session, job_id=db.job_id, kind=kind, **payload)
        session.commit()

    db.wait(write)


def _cancel_asked(db: JobDb) -> bool:
    return bool(db.wait(lambda s: cancel_requested(s, job_id=db.job_id)))


def _fail(db: JobDb, exc: Exception) -> JobStatus:
    """End the job ``failed``: a ``FinetuneError``'s message is for the user as it stands; any
    other error is logged with an id the user is shown instead of its details."""
    if isinstance(exc, FinetuneError):
        error = exc.message
    else:
        error_id = uuid.uuid4().hex[:8]
        log.exception("job %d failed with an internal error (error id %s)", db.job_id, error_id)
        error = f"internal error (error id {error_id}; the runner's log has the details)"
    _state(db, JobStatus.failed, error=error)
    return JobStatus.failed


# Training ---------------------------------------------------------------------------------------


def _run_training(
    db: JobDb, store: ArtifactStore, settings: Settings, job: Job
) -> JobStatus | None:
    assert job.id is not None
    hooks = _TrainingHooks(db, store, job)
    try:
        spec, dataset = _prepare(db, store, settings, job, hooks)
        from runner.train.recipe import train

        STOP.in_training_loop = True
        try:
            result = train(spec, hooks.hooks())
        finally:
            STOP.in_training_loop = False
        hooks.flush()
    except (ClaimLost, DatabaseAway):
        raise
    except Exception as exc:
        hooks.flush_quietly()
        return _fail(db, exc)
    curve = store.put_bytes(_loss_curve(result.losses, job.id))
    losses = store.put_bytes(json.dumps([round(x, 5) for x in result.losses]).encode())
    summary: dict[str, Any] = {
        "steps": result.step,
        "total_steps": result.total_steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_second, 1),
        "loss_curve_sha256": curve.sha256,
        "losses_sha256": losses.sha256,  # the per-step losses as JSON (a sweep's overlaid plot)
        "dataset": dataset.name,
    }
    if result.status == "stopped" and STOP.requested.is_set():
        _requeue(db, f"its runner was stopped at step {result.step}; it resumes from there")
        return None
    if result.status == "stopped" or _cancel_asked(db):
        reason = (
            "cancelled on request; its last checkpoint is kept"
            if result.status == "stopped"
            else "cancelled on request after training; its checkpoint is kept, not evaluated"
        )
        _state(db, JobStatus.cancelled, reason=reason, **summary)
        return JobStatus.cancelled
    if not _state(db, JobStatus.evaluating, event="trained", **summary):
        return None  # another attempt owns the job now
    try:
        if dataset.kind == "pt":
            summary["evaluation"] = _evaluate_perplexity(db, store, settings, job, dataset)
        else:
            summary["evaluation"] = _evaluate(db, store, settings, job, dataset)
    except Cancelled:
        _state(
            db,
            JobStatus.cancelled,
            reason="cancelled on request during evaluation; its checkpoint is kept, not evaluated",
        )
        return JobStatus.cancelled
    except (ClaimLost, DatabaseAway):
        raise
    except Exception as exc:
        message = exc.message if isinstance(exc, FinetuneError) else type(exc).__name__
        log.exception("job %d: evaluation failed", job.id)
        _state(
            db,
            JobStatus.failed,
            error=f"training finished and its checkpoint is kept, but the evaluation "
            f"failed: {message} (`/finetune evaluate` runs it again)",
        )
        return JobStatus.failed
    _state(db, JobStatus.succeeded, **summary)
    return JobStatus.succeeded


class _TrainingHooks:
    """The recipe's hooks for one attempt. Progress and checkpoint registrations that the database
    could not take are kept and written at the next chance; training never waits for it."""

    def __init__(self, db: JobDb, store: ArtifactStore, job: Job) -> None:
        assert job.id is not None
        self.db, self.store, self.job = db, store, job
        self.pending_progress: dict[str, Any] | None = None
        self.pending_checkpoints: list[dict[str, Any]] = []
        self.last_poll = 0.0
        self.samples = 0

    def hooks(self) -> TrainHooks:
        from runner.train.recipe import TrainHooks

        return TrainHooks(
            on_start=self.on_start,
            on_note=lambda message: _event(self.db, "status", message=message),
            on_progress=self.on_progress,
            should_stop=self.should_stop,
            checkpoint_dir=self.checkpoint_dir,
            on_checkpoint=self.on_checkpoint,
        )

    def on_start(self, resumed_from_step: int | None) -> None:
        _event(
            self.db,
            "started",
            attempt=self.job.attempts,
            owner=self.job.lease_owner,
            samples=self.samples,
            resumed_from_step=resumed_from_step,
        )

    def relpath(self, step: int) -> str:
        return f"checkpoints/job-{self.job.id}/step-{step:06d}-attempt-{self.job.attempts}"

    def on_progress(self, progress: dict[str, Any]) -> bool:
        self._flush_checkpoints(wait=False)
        return self._write_progress(progress, wait=False)

    def _write_progress(self, progress: dict[str, Any], *, wait: bool) -> bool:
        db = self.db

        def write(session: Session) -> bool:
            return record_progress(session, job_id=db.job_id, token=db.token, progress=progress)

        go_on: bool | None
        if wait:
            ok, go_on = True, db.wait(write)
        else:
            ok, go_on = db.try_once(write)
        if not ok:
            self.pending_progress = progress  # only the newest matters: the header shows it
            return True
        self.pending_progress = None
        if not go_on and not db.wait(lambda s: holds_lease(s, job_id=db.job_id, token=db.token)):
            raise ClaimLost("this attempt's claim on the job was taken over")
        return bool(go_on)  # False: cancel was requested

    def should_stop(self) -> bool:
        if STOP.requested.is_set():
            return True
        now = time.monotonic()
        if now - self.last_poll < CANCEL_POLL_SECONDS:
            return False
        self.last_poll = now
        if self.pending_progress is not None and not self._write_progress(
            self.pending_progress, wait=False
        ):
            return True
        self._flush_checkpoints(wait=False)
        ok, asked = self.db.try_once(lambda s: cancel_requested(s, job_id=self.db.job_id))
        return bool(ok and asked)

    @contextmanager
    def checkpoint_dir(self, step: int, final: bool) -> Iterator[Path]:
        with self.store.staged_dir(self.relpath(step)) as directory:
            yield directory

    def on_checkpoint(self, step: int, final: bool, directory: Path) -> None:
        import json

        relpath = self.relpath(step)
        meta = json.loads((self.store.path(relpath) / "meta.json").read_text())
        self.pending_checkpoints.append(
            {
                "step": step,
                "final": final,
                "path": relpath,
                "base_model": self.job.base_model,
                "meta": meta,
            }
        )
        self._flush_checkpoints(wait=False)

    def _flush_checkpoints(self, *, wait: bool) -> None:
        db = self.db
        while self.pending_checkpoints:
            fields = self.pending_checkpoints[0]

            def write(session: Session, fields: dict[str, Any] = fields) -> Checkpoint | None:
                return add_checkpoint(session, job_id=db.job_id, token=db.token, **fields)

            if wait:
                registered = db.wait(write)
            else:
                ok, registered = db.try_once(write)
                if not ok:
                    return
            fenced(registered)
            self.pending_checkpoints.pop(0)

    def flush(self) -> None:
        """Write what the database could not take during training; waits for it."""
        if self.pending_progress is not None:
            self._write_progress(self.pending_progress, wait=True)
        self._flush_checkpoints(wait=True)

    def flush_quietly(self) -> None:
        """``flush`` before the job is failed: a checkpoint saved before the failure is kept."""
        try:
            self.flush()
        except (ClaimLost, DatabaseAway):
            raise
        except Exception:
            log.exception("job %d: writing pending progress failed", self.db.job_id)


def _prepare(
    db: JobDb, store: ArtifactStore, settings: Settings, job: Job, hooks: _TrainingHooks
) -> tuple[TrainSpec, Dataset]:
    from runner.train.recipe import TrainingFailed, TrainSpec

    assert job.id is not None
    config = build_train_config(job.config)
    dataset = (
        db.wait(lambda s: s.get(Dataset, job.dataset_id)) if job.dataset_id is not None else None
    )
    if dataset is None:
        raise TrainingFailed(f"job {job.id} has no dataset (dataset id {job.dataset_id})")
    if dataset.kind == "benchmark":
        raise TrainingFailed(benchmark_refusal(dataset))
    if problem := stage_problem(dataset, config.stage):
        raise TrainingFailed(problem)

    def status(message: str) -> None:
        _event(db, "status", message=message)

    base_meta: dict[str, Any] = {}
    if (base_id := config.base_checkpoint_id) is not None:
        from runner.pt import checkpoint_base_meta, ensure_checkpoint_base

        base_checkpoint = db.wait(lambda s: s.get(Checkpoint, base_id))
        if base_checkpoint is None:
            raise TrainingFailed(f"base={config.base}: checkpoint {base_id} no longer exists")
        ensure_checkpoint_base(store, settings, base_checkpoint, on_status=status)
        base_meta = {"base_checkpoint": checkpoint_base_meta(base_checkpoint)}
    model_dir = model_dir_for(settings, job.base_model, on_status=status)
    assert model_dir is not None
    tokenizer = load_tokenizer(model_dir)
    stage_meta: dict[str, Any]
    if config.stage == "pt":
        from runner.pt import pt_examples

        documents = read_documents(store, dataset.train_sha256)[: config.max_samples]
        examples = pt_examples(tokenizer, documents, config)
        stage_meta = {
            "stage": "pt",
            "labels": None,
            "prompt_frame": {},
            "documents": len(documents),
        }
        status(
            f"continued pre-training on {len(documents)} documents as {len(examples)} sequences "
            f"(long_docs={config.long_docs}, cutoff_len {config.cutoff_len}), loss on every token"
        )
    else:
        conversations = read_split(store, dataset.train_sha256)[: config.max_samples]
        mixed, mix_meta = _mix_in(db, store, job, config, len(conversations))
        examples = [render_training_example(tokenizer, c) for c in conversations + mixed]
        stage_meta = {
            "labels": dataset.labels,
            "prompt_frame": dataset.prompt_frame,
            "answer_style": answer_style([answer_of(c) for c in conversations]).to_dict(),
            **({"mix": mix_meta} if mix_meta is not None else {}),
        }
    saved = db.wait(lambda s: job_checkpoints(s, job_id=db.job_id))
    hooks.samples = len(examples)
    meta = {
        "protocol_version": PROTOCOL_VERSION,
        "base_model": job.base_model,
        **({"base_build": build} if (build := base_model_build(job.base_model)) else {}),
        **base_meta,
        "method": config.method,
        "adapter": config.method in ("lora", "qlora"),
        **stage_meta,
        "dataset": {"id": dataset.id, "name": dataset.name, "version": dataset.version},
        "job_id": job.id,
    }
    spec = TrainSpec(
        config=config,
        examples=examples,
        base=model_dir,
        meta=meta,
        resume_from=[store.path(c.path) for c in saved],  # newest first: the first that loads
        token_budget=settings.runner_token_budget,
        compile_layers=settings.runner_compile,
        cuda_graphs=settings.runner_cuda_graphs,
    )
    _check_memory(spec)
    return spec, dataset


def _mix_in(
    db: JobDb, store: ArtifactStore, job: Job, config: Any, task_samples: int
) -> tuple[list[Any], dict[str, Any] | None]:
    """``mix=NAME:SHARE``: round(SHARE x the task's samples) conversations from NAME's train split
    (within ``max_samples`` in all), drawn in an order fixed by the job's seed (repeating the
    split when it is smaller), and what was mixed, for the checkpoint's meta."""
    import random

    from runner.train.recipe import TrainingFailed
    from storage.datasets import mix_dataset

    spec = config.mix_spec
    if spec is None:
        return [], None
    name, share = spec
    try:
        general = db.wait(lambda s: mix_dataset(s, name=name, channel_id=job.channel_id))
    except FinetuneError as exc:
        raise TrainingFailed(exc.message) from exc
    rows = read_split(store, general.train_sha256)
    wanted = min(round(share * task_samples), max(config.max_samples - task_samples, 0))
    order = list(range(len(rows)))
    random.Random(config.seed).shuffle(order)
    picked = [rows[order[i % len(order)]] for i in range(wanted)] if order else []
    meta = {
        "dataset": {"id": general.id, "name": general.name, "version": general.version},
        "share": share,
        "samples": len(picked),
        "task_samples": task_samples,
    }
    _event(
        db,
        "status",
        message=f"mixing in {len(picked)} samples of {general.name} v{general.version} "
        f"({share:g} of the {task_samples} task samples)",
    )
    return picked, meta


def benchmark_refusal(dataset: Dataset) -> str:
    return (
        f"dataset {dataset.name} v{dataset.version} is a benchmark (multiple-choice questions "
        "for the general-ability check, EVAL_GENERAL_BENCHMARK): it scores models and is never "
        "trained on; name a training dataset"
    )


def _check_memory(spec: TrainSpec) -> None:
    """Refuse a job that cannot fit on this GPU, or turn on gradient checkpointing if that fits."""
    import torch

    from runner.train.recipe import TrainingFailed

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


def _loss_curve(losses: list[float], job_id: int) -> bytes:
    from runner.plots import loss_curve_png

    return loss_curve_png(losses, title=f"job {job_id}: training loss")


# Evaluation -------------------------------------------------------------------------------------


def _evaluate(
    db: JobDb, store: ArtifactStore, settings: Settings, job: Job, dataset: Dataset
) -> dict[str, Any] | None:
    """Score the job's final checkpoint on the eval split (and the base model once per eval
    set), checking for cancel between the phases; posts the ``evaluated`` event (the report with
    its buttons)."""
    checkpoint = db.wait(lambda s: latest_checkpoint(s, job_id=db.job_id))
    assert checkpoint is not None and checkpoint.final
    return _evaluate_checkpoint(db, store, settings, checkpoint, dataset, job.base_model)


def _evaluate_perplexity(
    db: JobDb, store: ArtifactStore, settings: Settings, job: Job, dataset: Dataset
) -> dict[str, Any] | None:
    """A stage=pt job's evaluation: held-out perplexity of the base and of the final checkpoint
    (the ``perplexity`` event). No label scores, no Approve: a pt checkpoint is a base for SFT
    (``base=checkpoint-N``), never served itself."""
    from runner.eval.perplexity import model_perplexity

    if dataset.eval_sha256 is None:
        _event(db, "evaluation_skipped", reason="the dataset has no held-out documents")
        return None
    checkpoint = db.wait(lambda s: latest_checkpoint(s, job_id=db.job_id))
    assert checkpoint is not None and checkpoint.final
    documents = read_documents(store, dataset.eval_sha256)
    base_dir = model_dir_for(settings, job.base_model)
    assert base_dir is not None
    max_len = build_train_config(job.config).cutoff_len
    _release_gpu_memory()
    base = model_perplexity(base_dir, None, documents, adapter=False, max_len=max_len)
    if _cancel_asked(db):
        raise Cancelled()
    trained = model_perplexity(
        base_dir,
        store.path(checkpoint.path),
        documents,
        adapter=bool(checkpoint.meta.get("adapter", True)),
        max_len=max_len,
    )
    payload = {
        "checkpoint_id": checkpoint.id,
        "base_perplexity": base["perplexity"],
        "perplexity": trained["perplexity"],
        "documents": trained["documents"],
        "tokens": trained["tokens"],
    }
    _event(db, "perplexity", **payload)
    return payload


def _evaluate_checkpoint(
    db: JobDb,
    store: ArtifactStore,
    settings: Settings,
    checkpoint: Checkpoint,
    dataset: Dataset,
    base_model: str,
) -> dict[str, Any] | None:
    import gc

    from runner.eval.metrics import HEADLINE_KEYS
    from runner.eval.report import ensure_base_evaluation, evaluate_model

    gc.collect()
    _release_gpu_memory()
    if dataset.eval_sha256 is None:
        _event(db, "evaluation_skipped", reason="the dataset has no eval split")
        return None

    def check_cancel() -> None:
        if _cancel_asked(db):
            raise Cancelled()

    check_cancel()
    # A database outage while a model is scored means scoring it again (the prediction and the
    # row are written in one session); a long outage requeues the job (DatabaseAway).
    base = db.wait(
        lambda s: ensure_base_evaluation(s, store, settings, dataset=dataset, base_model=base_model)
    )
    check_cancel()
    evaluation = db.wait(
        lambda s: evaluate_model(
            s, store, settings, dataset=dataset, base_model=base_model, checkpoint=checkpoint
        )
    )
    check_cancel()
    metrics = evaluation.metrics
    payload = {
        "evaluation_id": evaluation.id,
        "base_evaluation_id": base.id,
        "checkpoint_id": checkpoint.id,
        "report_path": evaluation.report_path,
        **{key: metrics.get(key) for key in HEADLINE_KEYS},
        "free_invalid_rate": metrics.get("free_invalid_rate"),
        "free_truncated_rate": metrics.get("free_truncated_rate"),
        "per_class": metrics.get("per_class"),
        "vs_base": metrics.get("vs_base"),
        "vs_promoted": metrics.get("vs_promoted"),
        "backend": metrics.get("backend"),
        "backend_note": metrics.get("backend_note"),
        "prompts_note": metrics.get("prompts_note"),
        "truncated_prompts": metrics.get("truncated_prompts"),
        "samples_per_second": metrics.get("predict_samples_per_second"),
        "general": metrics.get("general"),
        "general_note": metrics.get("general_note"),
    }
    _event(db, "evaluated", **payload)
    return payload


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_evaluate(db: JobDb, store: ArtifactStore, settings: Settings, job: Job) -> JobStatus:
    """An evaluate job: score a checkpoint again (after a failed evaluation, or on request) and
    post its report with the Approve and Reject buttons in this job's thread."""
    try:
        checkpoint_id = int((job.config or {})["checkpoint_id"])
        checkpoint = db.wait(lambda s: s.get(Checkpoint, checkpoint_id))
        if checkpoint is None:
            raise NotFound(f"checkpoint {checkpoint_id} no longer exists")
        trained = db.wait(lambda s: s.get(Job, checkpoint.job_id))
        dataset_id = job.dataset_id or (trained.dataset_id if trained is not None else None)
        dataset = db.wait(lambda s: s.get(Dataset, dataset_id)) if dataset_id else None
        if dataset is None:
            raise NotFound(f"checkpoint {checkpoint_id}'s dataset is gone: nothing to score on")
        if checkpoint.meta.get("stage") == "pt":
            raise ConfigError(
                f"checkpoint {checkpoint_id} is a stage=pt checkpoint: its held-out perplexity is "
                "in its job's thread, and label scores do not apply to it (score the SFT job "
                f"started with base=checkpoint-{checkpoint_id} instead)"
            )
        if not _state(db, JobStatus.evaluating):
            return JobStatus.failed
        result = _evaluate_checkpoint(
            db, store, settings, checkpoint, dataset, checkpoint.base_model
        )
    except Cancelled:
        _state(db, JobStatus.cancelled, reason="cancelled on request during evaluation")
        return JobStatus.cancelled
    except (ClaimLost, DatabaseAway):
        raise
    except Exception as exc:
        return _fail(db, exc)
    _state(db, JobStatus.succeeded, evaluation=result)
    return JobStatus.succeeded


# Export -----------------------------------------------------------------------------------------


def _run_export(db: JobDb, store: ArtifactStore, settings: Settings, job: Job) -> JobStatus:
    """An export job: merge, quantize if asked, verify, publish (runner/export.py); cancel is
    checked at the start of each phase."""
    from runner.export import export_checkpoint

    config = job.config or {}

    def status(message: str) -> None:
        if _cancel_asked(db):
            raise Cancelled()
        _event(db, "status", message=message)

    def export(session: Session) -> dict[str, Any]:
        return export_checkpoint(
            session,
            store,
            settings,
            checkpoint_id=int(config["checkpoint_id"]),
            bits=config.get("bits"),
            quant=config.get("quant"),
            shard_size=config.get("shard_size", "5GB"),
            on_status=status,
        )

    try:
        report = db.wait(export)
    except Cancelled:
        _state(db, JobStatus.cancelled, reason="cancelled on request; nothing was published")
        return JobStatus.cancelled
    except (ClaimLost, DatabaseAway):
        raise
    except Exception as exc:
        return _fail(db, exc)
    _state(
        db,
        JobStatus.succeeded,
        event="exported",
        path=report["path"],
        absolute_path=str(store.path(report["path"])),
        bytes=report["bytes"],
        bits=report["export"]["bits"],
        quant=report["export"].get("quant"),
        checkpoint_id=report["checkpoint_id"],
        verification=report["verification"],
    )
    return JobStatus.succeeded
