"""``/finetune start|status|list|cancel|evaluate|export``: queueing jobs and looking at them.

Queueing a job from Slack (``queue_job``, ``queue_evaluation``, the export): the user's limits are
checked (``USER_MAX_QUEUED_JOBS``, ``USER_MAX_RUNNING_JOBS``), the job is created, its root message
posted and its ts stored as the job's thread; a runner claims a Slack job only once that ts is set.
When the root cannot be posted (the bot is not in the channel, the channel is archived…) the job
is cancelled at once, so nothing runs unseen, and the user is told why through ``respond``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from slack_sdk.errors import SlackApiError
from sqlalchemy import func, update
from sqlmodel import Session, col, select

from bot.blocks import job_header_blocks, job_line, job_noun, text_blocks
from bot.scope import Scope, find_checkpoint, find_job, require_approver, scope_of
from core.enums import JobKind, JobStatus
from core.errors import ConfigError, Conflict, FinetuneError, Forbidden, NotFound
from core.settings import Settings
from runner.config import TrainConfig, parse_train_args
from storage.datasets import (
    find_dataset,
    is_dataset_visible,
    latest_dataset,
    mix_dataset,
    visible_datasets,
)
from storage.db import new_session
from storage.jobs import add_job_event, create_job, request_cancel, set_job_thread
from storage.models import Checkpoint, Dataset, Job
from storage.types import utcnow

if TYPE_CHECKING:
    from bot.auth import Approvers
    from bot.commands import BotContext

log = logging.getLogger(__name__)

LIMITED_KINDS = tuple(
    kind.value for kind in (JobKind.train, JobKind.evaluate, JobKind.export, JobKind.distill)
)
ACTIVE = (JobStatus.running.value, JobStatus.evaluating.value)
# Slack's answers that mean the bot cannot write in the channel at all.
NOT_A_MEMBER = {"not_in_channel", "channel_not_found"}
ARCHIVED = {"is_archived", "channel_is_archived"}


class ChannelUnwritable(FinetuneError):
    """The job's root message could not be posted: the job was cancelled before anything ran."""

    code = "channel_unwritable"


# Queueing ----------------------------------------------------------------------------------------


def _jobs(count: int) -> str:
    return f"{count} job" if count == 1 else f"{count} jobs"


def check_user_limits(session: Session, settings: Settings, *, user: str) -> None:
    """Conflict, with the numbers, when ``user`` already has the most jobs queued or running
    that one user may have (approvers too: the limits keep a mistake, say a loop of starts,
    from filling every GPU, and an approver who needs room can cancel jobs)."""
    counts = dict(
        session.exec(
            select(Job.status, func.count())
            .where(Job.requested_by == user, col(Job.kind).in_(LIMITED_KINDS))
            .where(col(Job.status).in_([JobStatus.queued.value, *ACTIVE]))
            .group_by(col(Job.status))
        ).all()
    )
    queued = counts.get(JobStatus.queued.value, 0)
    running = sum(counts.get(status, 0) for status in ACTIVE)
    if queued >= settings.user_max_queued_jobs:
        raise Conflict(
            f"you have {_jobs(queued)} queued, the limit is {settings.user_max_queued_jobs}: "
            "cancel one or wait (`/finetune list`)"
        )
    if running >= settings.user_max_running_jobs:
        raise Conflict(
            f"you have {_jobs(running)} running, the limit is {settings.user_max_running_jobs}: "
            "cancel one or wait for one to finish (`/finetune list`)"
        )


def queue_job(
    ctx: BotContext, client: Any, *, dataset: Dataset, config: TrainConfig, user: str, channel: str
) -> Job:
    """Queue a training job on ``dataset`` (one the channel may use) and post its root message,
    whose ts becomes the job's thread."""
    if not is_dataset_visible(dataset, channel_id=channel):
        raise NotFound(
            f"no dataset {dataset.id} in this channel (`/finetune datasets` lists what it can use)"
        )
    if config.mix_spec is not None:  # refused now, not when the job starts
        with new_session(ctx.db) as session:
            mix_dataset(session, name=config.mix_spec[0], channel_id=channel)
    return queue_slack_job(
        ctx,
        client,
        kind=JobKind.train,
        base_model=ctx.base_model,
        dataset=dataset,
        config=config.model_dump(exclude_defaults=True),
        user=user,
        channel=channel,
    )


def queue_slack_job(
    ctx: BotContext,
    client: Any,
    *,
    kind: JobKind,
    base_model: str,
    dataset: Dataset | None,
    config: dict[str, Any],
    user: str,
    channel: str,
) -> Job:
    with new_session(ctx.db) as session:
        check_user_limits(session, ctx.settings, user=user)
        job = create_job(
            session,
            kind=kind,
            base_model=base_model,
            dataset_id=dataset.id if dataset is not None else None,
            config=config,
            requested_by=user,
            channel_id=channel,
        )
        return _post_root(session, client, job, dataset)


def _post_root(session: Session, client: Any, job: Job, dataset: Dataset | None) -> Job:
    """Post a queued job's root message; its ts becomes the job's thread (and the job can be
    claimed). If Slack refuses, the job is cancelled and ChannelUnwritable says why."""
    try:
        posted = client.chat_postMessage(
            channel=job.channel_id,
            text=f"{job_noun(job)} {job.id} queued",
            blocks=job_header_blocks(job, dataset),
        )
    except (SlackApiError, OSError) as exc:
        code = (
            str(exc.response.get("error") or "an error")
            if isinstance(exc, SlackApiError)
            else type(exc).__name__
        )
        cancel_unposted(session, job, code)
        raise ChannelUnwritable(_unposted_text(job, code)) from exc
    return set_job_thread(session, job=job, thread_ts=posted["ts"])


def cancel_unposted(session: Session, job: Job, code: str) -> None:
    """Cancel a job whose root message was refused; it was never claimable (no thread yet)."""
    session.rollback()
    assert job.id is not None
    reason = f"its first message could not be posted in the channel (Slack: {code}); nothing ran"
    session.execute(
        update(Job)
        .where(col(Job.id) == job.id, col(Job.status) == JobStatus.queued.value)
        .values(
            status=JobStatus.cancelled.value,
            cancel_requested=True,
            finished_at=utcnow(),
            error=reason,
        )
    )
    add_job_event(session, job_id=job.id, kind="cancelled", reason=reason)
    session.commit()
    log.warning("job %d cancelled: %s (channel %s)", job.id, reason, job.channel_id)


def _unposted_text(job: Job, code: str) -> str:
    again = "start again" if job.kind == JobKind.train else "ask again"
    cancelled = f"{job_noun(job)} {job.id} was cancelled; nothing ran"
    if code in NOT_A_MEMBER:
        return (
            f"I can't post in this channel: invite me with `/invite @finetune-bot`, then {again} "
            f"({cancelled})."
        )
    if code in ARCHIVED:
        return f"This channel is archived, so I can't post in it ({cancelled})."
    return f"Slack refused my message in this channel ({code}): {cancelled}; {again} in a minute."


# Subcommands -------------------------------------------------------------------------------------


def split_dataset_arg(args: list[str]) -> tuple[str | None, list[str]]:
    """``dataset=<name>`` out of a command's words, and the other words."""
    name = next((a.split("=", 1)[1] for a in args if a.startswith("dataset=")), None)
    return name, [a for a in args if not a.startswith("dataset=")]


def dataset_for(session: Session, name: str | None, *, channel: str) -> Dataset:
    """The dataset a training command names (this channel's, then a shared one, then the
    deployment's), or the channel's latest upload; NotFound saying what to do."""
    dataset = (
        find_dataset(session, name=name, channel_id=channel)
        if name
        else latest_dataset(session, channel_id=channel)
    )
    if dataset is None:
        raise NotFound(
            f"no dataset named {name} in this channel (its own, one shared by another "
            "channel, or the deployment's: `/finetune datasets`)"
            if name
            else "no dataset uploaded in this channel yet: share a file first, or name "
            "one with dataset=<name> (`/finetune datasets`)"
        )
    if dataset.kind == "benchmark":
        raise ConfigError(
            f"dataset {dataset.name} is a benchmark (multiple-choice questions for the "
            "general-ability check): it scores models and is never trained on; name a training "
            "dataset with dataset=<name>"
        )
    return dataset


def start(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    channel = command["channel_id"]
    if not args:  # the form: every setting with its default, a dataset picker, a file input
        from bot.views import start_modal

        with new_session(ctx.db) as session:
            datasets = visible_datasets(session, channel_id=channel, limit=100)
            latest = latest_dataset(session, channel_id=channel)
        client.views_open(
            trigger_id=command["trigger_id"],
            view=start_modal(
                datasets, channel_id=channel, default_dataset_id=latest.id if latest else None
            ),
        )
        return
    name, rest = split_dataset_arg(args)
    config = parse_train_args(rest)
    with new_session(ctx.db) as session:
        dataset = dataset_for(session, name, channel=channel)
    queue_job(ctx, client, dataset=dataset, config=config, user=command["user_id"], channel=channel)


def _latest_job(session: Session, scope: Scope) -> Job:
    query = select(Job)
    if not scope.everywhere:
        query = query.where(Job.channel_id == scope.channel)
    job = session.exec(query.order_by(col(Job.id).desc())).first()
    if job is None:
        raise NotFound("no job in this channel yet: `/finetune start …`")
    return job  # type: ignore[no-any-return]


def _one_ref(args: list[str], usage: str) -> None:
    if len(args) > 1:
        raise ConfigError(
            f"`{' '.join(args[1:])}`: `/finetune {usage}` takes one number (approvers may end "
            "it with `all`)"
        )


def status(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    scope, args = scope_of(ctx.approvers, command, args)
    _one_ref(args, "status [job]")
    with new_session(ctx.db) as session:
        job = find_job(session, scope, args[0]) if args else _latest_job(session, scope)
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
    respond(blocks=job_header_blocks(job, dataset), text=job_line(job), response_type="ephemeral")


def list_jobs(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    scope, _ = scope_of(ctx.approvers, command, args)
    with new_session(ctx.db) as session:
        query = select(Job)
        if not scope.everywhere:
            query = query.where(Job.channel_id == scope.channel)
        jobs = session.exec(query.order_by(col(Job.id).desc()).limit(15)).all()
    lines = [f"• {job_line(j, with_channel=scope.everywhere)}" for j in jobs]
    text = "\n".join(lines) if lines else f"No jobs {scope.where} yet."
    if lines:
        text += "\n`/finetune checkpoints` lists their checkpoints and what serves now."
    respond(blocks=text_blocks(text), text=text, response_type="ephemeral")


def cancel(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    scope, args = scope_of(ctx.approvers, command, args)
    if not args:
        respond(text="Which job? `/finetune cancel <job>`", response_type="ephemeral")
        return
    _one_ref(args, "cancel <job>")
    user = command["user_id"]
    with new_session(ctx.db) as session:
        job = cancel_job_as(session, ctx.approvers, find_job(session, scope, args[0]), user=user)
    respond(text=cancelled_text(job), response_type="ephemeral")


def cancel_job_as(session: Session, approvers: Approvers, job: Job, *, user: str) -> Job:
    """Cancel ``job`` for ``user``, its requester or an approver (Forbidden for anyone else):
    the one check behind `/finetune cancel` and the home's Cancel button."""
    if job.requested_by != user and not approvers.allows(user):
        raise Forbidden(
            f"only <@{job.requested_by}> (who started job {job.id}) or an approver can cancel it"
        )
    assert job.id is not None
    return request_cancel(session, job_id=job.id, by=user)


def cancelled_text(job: Job) -> str:
    """What a cancel did: cancelled (it was queued) or asked to stop."""
    stopping = {
        JobKind.evaluate.value: "asked to stop; the evaluation ends before its next phase, "
        "without a report",
        JobKind.export.value: "asked to stop; the export ends before its next phase and "
        "publishes nothing",
        JobKind.distill.value: "asked to stop; it asks the teacher nothing more, keeps every "
        "finished sample, and the same `/finetune distill` resumes",
    }
    state = (
        "cancelled"
        if job.status == JobStatus.cancelled
        else stopping.get(job.kind, "asked to stop; it keeps its last checkpoint")
    )
    return f"Job {job.id} {state}."


def evaluate(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    """Score a checkpoint again (after a failed evaluation, or to see it on today's eval split):
    an evaluate job with its own thread, where the report with Approve and Reject lands."""
    scope, args = scope_of(ctx.approvers, command, args)
    if len(args) != 1:
        respond(
            text="Which checkpoint? `/finetune evaluate <checkpoint>`", response_type="ephemeral"
        )
        return
    user = command["user_id"]
    with new_session(ctx.db) as session:
        checkpoint, trained = find_checkpoint(session, scope, args[0])
        requester = trained.requested_by if trained is not None else None
        if requester != user and not ctx.approvers.allows(user):
            who = f"<@{requester}> (who started job {trained.id})" if trained and requester else ""
            raise Forbidden(
                f"only {who + ' or ' if who else ''}an approver can evaluate "
                f"checkpoint {checkpoint.id}"
            )
        dataset = (
            session.get(Dataset, trained.dataset_id)
            if trained is not None and trained.dataset_id
            else None
        )
        if dataset is None:
            raise NotFound(f"checkpoint {checkpoint.id} has no dataset to be scored on")
        if not dataset.eval_samples:
            raise Conflict(
                f"checkpoint {checkpoint.id}'s dataset *{dataset.name}* v{dataset.version} has "
                "no eval split: nothing to score it on"
            )
        _refuse_second_evaluation(session, checkpoint)
    queue_slack_job(
        ctx,
        client,
        kind=JobKind.evaluate,
        base_model=checkpoint.base_model,
        dataset=dataset,
        config={"checkpoint_id": checkpoint.id},
        user=user,
        channel=command["channel_id"],
    )


def _refuse_second_evaluation(session: Session, checkpoint: Checkpoint) -> None:
    pending = session.exec(
        select(Job).where(
            Job.kind == JobKind.evaluate.value,
            col(Job.status).in_([JobStatus.queued.value, *ACTIVE]),
        )
    ).all()
    for job in pending:
        if (job.config or {}).get("checkpoint_id") == checkpoint.id:
            raise Conflict(
                f"checkpoint {checkpoint.id} is being evaluated already: evaluation job "
                f"{job.id} is {job.status}"
            )


def export(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    from runner.export import check_export
    from storage.artifacts import ArtifactStore

    scope, args = scope_of(ctx.approvers, command, args)
    if not args or not args[0].isdigit():
        respond(
            text="Which checkpoint? `/finetune export <checkpoint> [bits=8|4 | format=gguf "
            "[quant=f16|q8_0|q4_0]]`",
            response_type="ephemeral",
        )
        return
    bits: int | None = None
    quant: str | None = None
    for arg in args[1:]:
        key, _, value = arg.partition("=")
        if key == "bits" and value in ("4", "8"):
            bits = int(value)
        elif key == "format" and value in ("gguf", "safetensors"):
            quant = (quant or "f16") if value == "gguf" else None
        elif key == "quant":
            quant = value.lower()  # checked with the rest by check_export
        else:
            raise ConfigError(
                f"`{arg}`: the export settings are bits=8|4, or format=gguf with "
                "quant=f16|q8_0|q4_0"
            )
    user, channel = command["user_id"], command["channel_id"]
    require_approver(ctx.approvers, user, "export a model")
    store = ArtifactStore(ctx.settings.artifact_dir)
    with new_session(ctx.db) as session:
        find_checkpoint(session, scope, args[0])
        checkpoint = check_export(
            session, store, checkpoint_id=int(args[0]), bits=bits, quant=quant, here=False
        )
        trained = session.get(Job, checkpoint.job_id)
        dataset = (
            session.get(Dataset, trained.dataset_id) if trained and trained.dataset_id else None
        )
    queue_slack_job(
        ctx,
        client,
        kind=JobKind.export,
        base_model=checkpoint.base_model,
        dataset=dataset,
        config={
            "checkpoint_id": checkpoint.id,
            **({"bits": bits} if bits else {}),
            **({"quant": quant} if quant else {}),
        },
        user=user,
        channel=channel,
    )
