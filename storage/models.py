"""Tables. The database is the single source of truth: jobs are the queue, job events are the
outbox to Slack, promotions and the audit log are the trail of every decision."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, Index, Text, text
from sqlmodel import Field, SQLModel

from core.enums import CheckpointStatus, JobKind, JobStatus
from storage.types import JSONType, UtcDateTime, utcnow


def _json(**kw: Any) -> Any:
    return Field(sa_column=Column(JSONType, nullable=kw.pop("nullable", False)), **kw)


def _when(nullable: bool = False, **kw: Any) -> Any:
    if nullable:
        return Field(default=None, sa_column=Column(UtcDateTime(), nullable=True), **kw)
    return Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False), **kw)


class Dataset(SQLModel, table=True):
    """An ingested upload: normalised train/eval splits stored as artifacts, and the report.

    Names are scoped: a dataset uploaded in a channel belongs to that channel (its versions count
    up there alone); one ingested without a channel (the CLI, the demo) belongs to the deployment
    and every channel sees it, as does a channel's dataset marked ``shared``."""

    __tablename__ = "datasets"
    __table_args__ = (
        Index(
            "uq_datasets_scope_name_version",
            text("coalesce(channel_id, '')"),
            "name",
            "version",
            unique=True,
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100, index=True)
    version: int = 1
    source_name: str = Field(max_length=255, description="the uploaded file or folder name")
    format: str = Field(max_length=40)
    kind: str = Field(
        default="sft",
        max_length=20,
        sa_column_kwargs={"server_default": "sft"},
        description="sft: conversations to fine-tune on; pt: raw text for continued pre-training "
        "(stage=pt); benchmark: multiple-choice questions that score "
        "general ability (runner/eval/benchmark.py), never trained on",
    )
    train_sha256: str = Field(max_length=64)
    eval_sha256: str | None = Field(default=None, max_length=64)
    train_samples: int
    eval_samples: int = 0
    labels: list[str] | None = _json(default=None, nullable=True)
    prompt_frame: dict[str, Any] = _json(default_factory=dict)
    report: dict[str, Any] = _json(default_factory=dict)
    channel_id: str | None = Field(default=None, max_length=32, index=True)
    shared: bool = Field(default=False, description="a channel's dataset every channel may use")
    uploaded_by: str | None = Field(default=None, max_length=32)
    created_at: datetime = _when()


class Sweep(SQLModel, table=True):
    """Several training jobs queued together over a grid of settings (``/finetune sweep``), to
    compare in one thread. Its runs are the jobs whose ``sweep_id`` is its id."""

    __tablename__ = "sweeps"

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int | None = Field(default=None, foreign_key="datasets.id")
    base_model: str = Field(max_length=255)
    grid: dict[str, Any] = _json(default_factory=dict)  # setting → its values, as given
    fixed: dict[str, Any] = _json(default_factory=dict)  # the settings every run shares
    requested_by: str | None = Field(default=None, max_length=32)
    channel_id: str | None = Field(default=None, max_length=32)
    thread_ts: str | None = Field(default=None, max_length=32)
    cancel_requested: bool = False
    created_at: datetime = _when()
    # Set once, by whoever sees its last run end (an atomic update): that one draws the plots.
    finished_at: datetime | None = _when(nullable=True)


class Job(SQLModel, table=True):
    """A unit of work for a runner. Its row is its place in the queue."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_id", "status", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(default=JobKind.train.value, max_length=16)
    status: str = Field(default=JobStatus.queued.value, max_length=16)
    dataset_id: int | None = Field(default=None, foreign_key="datasets.id")
    base_model: str = Field(max_length=255)
    config: dict[str, Any] = _json(default_factory=dict)
    requested_by: str | None = Field(default=None, max_length=32)
    channel_id: str | None = Field(default=None, max_length=32)
    thread_ts: str | None = Field(default=None, max_length=32)
    # Why the notifier gave up on the job's thread (the channel is archived, the bot was removed).
    thread_error: str | None = Field(default=None, max_length=300)
    lease_owner: str | None = Field(default=None, max_length=100, description="host:pid, shown")
    # The fencing token of the current claim: every write of an attempt checks it, so an attempt
    # whose claim was taken over (its lease expired, the job was claimed again) changes nothing.
    lease_token: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = _when(nullable=True)
    attempts: int = 0
    cancel_requested: bool = False
    progress: dict[str, Any] = _json(default_factory=dict)
    error: str | None = None
    created_at: datetime = _when()
    started_at: datetime | None = _when(nullable=True)
    finished_at: datetime | None = _when(nullable=True)
    sweep_id: int | None = Field(default=None, foreign_key="sweeps.id", index=True)


class JobEvent(SQLModel, table=True):
    """The outbox: what happened to a job, relayed to Slack by the notifier
    (at least once: see bot/notifier.py)."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_undelivered", "delivered_at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", index=True)
    kind: str = Field(max_length=32)
    payload: dict[str, Any] = _json(default_factory=dict)
    created_at: datetime = _when()
    delivered_at: datetime | None = _when(nullable=True)
    # Set when the event was given up on (delivered_at is set too): the Slack error or the reason.
    delivery_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class Checkpoint(SQLModel, table=True):
    """A saved adapter (or model) directory under ARTIFACT_DIR with its meta.json."""

    __tablename__ = "checkpoints"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", index=True)
    step: int
    final: bool = False
    path: str = Field(max_length=500, description="relative to ARTIFACT_DIR")
    base_model: str = Field(max_length=255)
    status: str = Field(default=CheckpointStatus.candidate.value, max_length=16)
    meta: dict[str, Any] = _json(default_factory=dict)
    decided_by: str | None = Field(default=None, max_length=32)
    decided_at: datetime | None = _when(nullable=True)
    created_at: datetime = _when()


class Evaluation(SQLModel, table=True):
    """Scores of one model (a checkpoint, or the base model when checkpoint_id is null) on one
    dataset's eval split."""

    __tablename__ = "evaluations"

    id: int | None = Field(default=None, primary_key=True)
    checkpoint_id: int | None = Field(default=None, foreign_key="checkpoints.id", index=True)
    dataset_id: int = Field(foreign_key="datasets.id", index=True)
    base_model: str = Field(max_length=255)
    metrics: dict[str, Any] = _json(default_factory=dict)
    report_path: str | None = Field(default=None, max_length=500)
    created_at: datetime = _when()


class Promotion(SQLModel, table=True):
    """Which checkpoint serves, since when, decided by whom. The newest row is the current one;
    checkpoint_id null means the base model serves."""

    __tablename__ = "promotions"

    id: int | None = Field(default=None, primary_key=True)
    checkpoint_id: int | None = Field(default=None, foreign_key="checkpoints.id")
    previous_checkpoint_id: int | None = Field(default=None, foreign_key="checkpoints.id")
    action: str = Field(max_length=16, description="promote or rollback")
    decided_by: str = Field(max_length=32)
    created_at: datetime = _when()


class AuditLog(SQLModel, table=True):
    """Every decision and privileged action, append-only."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    actor: str = Field(max_length=32)
    action: str = Field(max_length=32)
    target: str | None = Field(default=None, max_length=100)
    detail: dict[str, Any] = _json(default_factory=dict)
    created_at: datetime = _when()


class SlackEvent(SQLModel, table=True):
    """Slack event ids already handled: Slack retries events, this makes each one count once."""

    __tablename__ = "slack_events"

    event_id: str = Field(primary_key=True, max_length=64)
    received_at: datetime = _when()


class Feedback(SQLModel, table=True):
    """A correction or a confirmation of one ``/classify`` answer, recorded only when a user
    chose it on the answer (the headline is stored then, not when it was typed). One row per
    user and answer: a later choice on the same answer replaces the earlier one. Rows older than
    ``FEEDBACK_RETENTION_DAYS`` are deleted; an export points at the dataset it went into."""

    __tablename__ = "feedback"
    __table_args__ = (
        Index("uq_feedback_answer_user", "channel_id", "message_ts", "user_id", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16, description="correction or confirmation")
    channel_id: str = Field(max_length=32)
    message_ts: str = Field(max_length=32, description="the answer's message")
    user_id: str = Field(max_length=32)
    text: str = Field(sa_column=Column(Text, nullable=False))
    predicted_label: str = Field(max_length=150)
    confidence: float | None = None
    correct_label: str = Field(max_length=150)
    checkpoint_id: int = Field(foreign_key="checkpoints.id", index=True)
    created_at: datetime = _when()
    exported_at: datetime | None = _when(nullable=True)
    dataset_id: int | None = Field(default=None, foreign_key="datasets.id")
