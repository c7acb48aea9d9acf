"""States shared by storage, runner, serving and bot."""

from enum import StrEnum


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    evaluating = "evaluating"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class JobKind(StrEnum):
    train = "train"
    evaluate = "evaluate"
    export = "export"
    ingest = "ingest"  # a dataset shared in Slack, validated and stored by a runner
    distill = "distill"  # a teacher writes the reasoning of a label-only dataset (no GPU)


class CheckpointStatus(StrEnum):
    candidate = "candidate"
    promoted = "promoted"
    retired = "retired"
    rejected = "rejected"


class Split(StrEnum):
    train = "train"
    eval = "eval"


class FeedbackKind(StrEnum):
    correction = "correction"  # the model's label was wrong: the user chose the right one
    confirmation = "confirmation"  # a 👍: the model's label was right
