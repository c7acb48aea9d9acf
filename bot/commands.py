"""``/finetune`` subcommands. Every handler acks at once; the answer follows through
``respond`` (ephemeral unless the channel should see it) or a channel message."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from bot.auth import Approvers
from bot.blocks import dataset_line, job_header_blocks, job_line, text_blocks
from core.enums import JobStatus
from core.errors import FinetuneError, Forbidden, NotFound
from core.settings import Settings
from runner.config import help_lines, parse_train_args
from storage.datasets import get_dataset, latest_dataset, list_datasets
from storage.db import new_session
from storage.jobs import create_job, request_cancel
from storage.models import Dataset, Job

log = logging.getLogger(__name__)

USAGE = {
    "help": "this message",
    "datasets": "the datasets uploaded so far",
    "start [dataset=<name>] [key=value …]": "queue a training job (the dataset defaults to the "
    "latest uploaded in this channel)",
    "status [job]": "a job's state and progress",
    "list": "the latest jobs in this channel",
    "cancel <job>": "stop a job (its requester or an approver)",
}


@dataclass
class BotContext:
    settings: Settings
    db: Engine
    approvers: Approvers
    base_model: str


def usage_text(unknown: str | None = None) -> str:
    head = f"Unknown subcommand `{unknown}`. " if unknown else ""
    lines = [f"{head}*`/finetune` subcommands:*"]
    lines += [f"• `/finetune {name}` — {what}" for name, what in USAGE.items()]
    lines.append("Training settings for `start` (key=value):")
    lines += [f"• `{line.split(':', 1)[0]}`" for line in help_lines()]
    return "\n".join(lines)


def register(app: Any, ctx: BotContext) -> None:
    @app.command("/finetune")
    def handle_finetune(
        ack: Callable[..., None], command: dict[str, Any], respond: Any, client: Any
    ) -> None:
        ack()
        words = (command.get("text") or "").split()
        sub, args = (words[0].lower(), words[1:]) if words else ("help", [])
        handler = SUBCOMMANDS.get(sub)
        try:
            if handler is None:
                respond(text=usage_text(sub), response_type="ephemeral")
                return
            handler(ctx, command, args, respond, client)
        except FinetuneError as exc:
            respond(text=f":warning: {exc.message}", response_type="ephemeral")
        except Exception:
            error_id = uuid.uuid4().hex[:8]
            log.exception("/finetune %s failed (error id %s)", sub, error_id)
            respond(
                text=f"Something went wrong (error id `{error_id}`); the bot's log has the "
                "details.",
                response_type="ephemeral",
            )


def _help(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    respond(text=usage_text(), response_type="ephemeral")


def _datasets(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    with new_session(ctx.db) as session:
        datasets = list_datasets(session, limit=20)
    text = (
        "\n".join(f"• {dataset_line(d)}" for d in datasets)
        if datasets
        else "No datasets yet: share a dataset file in this channel (`/finetune help`)."
    )
    respond(text=text, response_type="ephemeral")


def _start(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    if not args:
        respond(
            text="Give the settings to train with, for example `/finetune start lr=5e-6 "
            "grad_accum=2 loraplus=16`.\n" + usage_text(),
            response_type="ephemeral",
        )
        return
    name = next((a.split("=", 1)[1] for a in args if a.startswith("dataset=")), None)
    settings_args = [a for a in args if not a.startswith("dataset=")]
    config = parse_train_args(settings_args)  # ConfigError: the allowed keys and ranges
    channel = command["channel_id"]
    with new_session(ctx.db) as session:
        dataset = (
            get_dataset(session, name=name) if name else latest_dataset(session, channel_id=channel)
        )
        if dataset is None:
            raise NotFound(
                f"no dataset named {name}"
                if name
                else "no dataset uploaded in this channel yet: share a file first, or name "
                "one with dataset=<name> (`/finetune datasets`)"
            )
        job = create_job(
            session,
            base_model=ctx.base_model,
            dataset_id=dataset.id,
            config=config.model_dump(exclude_defaults=True),
            requested_by=command["user_id"],
            channel_id=channel,
        )
        posted = client.chat_postMessage(
            channel=channel,
            text=f"Fine-tuning job {job.id} queued",
            blocks=job_header_blocks(job, dataset),
        )
        job.thread_ts = posted["ts"]
        session.add(job)
        session.commit()


def _find_job(session: Any, command: dict, args: list[str]) -> Job:
    if args:
        if not args[0].isdigit():
            raise NotFound(f"`{args[0]}` is not a job number")
        job = session.get(Job, int(args[0]))
        if job is None:
            raise NotFound(f"no job {args[0]}")
        return job  # type: ignore[no-any-return]
    job = session.exec(
        select(Job).where(Job.channel_id == command["channel_id"]).order_by(col(Job.id).desc())
    ).first()
    if job is None:
        raise NotFound("no job in this channel yet: `/finetune start …`")
    return job  # type: ignore[no-any-return]


def _status(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    with new_session(ctx.db) as session:
        job = _find_job(session, command, args)
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
    respond(blocks=job_header_blocks(job, dataset), text=job_line(job), response_type="ephemeral")


def _list(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    with new_session(ctx.db) as session:
        jobs = session.exec(
            select(Job)
            .where(Job.channel_id == command["channel_id"])
            .order_by(col(Job.id).desc())
            .limit(15)
        ).all()
    text = "\n".join(f"• {job_line(j)}" for j in jobs) if jobs else "No jobs in this channel yet."
    respond(blocks=text_blocks(text), text=text, response_type="ephemeral")


def _cancel(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    if not args:
        respond(text="Which job? `/finetune cancel <job>`", response_type="ephemeral")
        return
    user = command["user_id"]
    with new_session(ctx.db) as session:
        job = _find_job(session, command, args[:1])
        if job.requested_by != user and not ctx.approvers.allows(user):
            raise Forbidden(
                f"only <@{job.requested_by}> (who started job {job.id}) or an "
                "approver can cancel it"
            )
        assert job.id is not None
        job = request_cancel(session, job_id=job.id, by=user)
    state = (
        "cancelled"
        if job.status == JobStatus.cancelled
        else "asked to stop; it keeps its last checkpoint"
    )
    respond(text=f"Job {job.id} {state}.", response_type="ephemeral")


SUBCOMMANDS: dict[str, Callable[..., None]] = {
    "help": _help,
    "datasets": _datasets,
    "start": _start,
    "status": _status,
    "list": _list,
    "cancel": _cancel,
}
