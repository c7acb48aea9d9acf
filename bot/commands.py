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
from bot.blocks import (
    classify_blocks,
    compare_text,
    dataset_line,
    job_header_blocks,
    job_line,
    rollback_confirm_blocks,
    served_name,
    text_blocks,
)
from bot.serving_client import call_serving
from core.enums import JobKind, JobStatus
from core.errors import ConfigError, FinetuneError, Forbidden, NotFound
from core.settings import Settings
from runner.config import TrainConfig, help_lines, parse_train_args
from storage.datasets import get_dataset, latest_dataset, list_datasets
from storage.db import new_session
from storage.jobs import create_job, request_cancel
from storage.models import Dataset, Job

log = logging.getLogger(__name__)

USAGE = {
    "help": "this message",
    "upload": "how to share a dataset file with the bot",
    "datasets": "the datasets uploaded so far",
    "start [dataset=<name>] [key=value …]": "queue a training job (the dataset defaults to the "
    "latest uploaded in this channel)",
    "status [job]": "a job's state and progress",
    "list": "the latest jobs in this channel",
    "cancel <job>": "stop a job (its requester or an approver)",
    "compare <a> <b>": "eval scores of two checkpoints (or `base`) side by side",
    "promote <checkpoint>": "serve a checkpoint (approvers)",
    "rollback [to <checkpoint>|to base]": "serve what served before the current checkpoint "
    "(or a checkpoint that served before); shows the target and asks to confirm (approvers)",
    "export <checkpoint> [bits=8|4]": "a standalone merged model, optionally quantized, "
    "verified before it is announced (approvers)",
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


UPLOAD_HELP = (
    "*Share a dataset file in this channel* (drag it in, or the + button → Upload) or in a DM "
    "with me; I fetch it, check it and post the validation report in a thread. Accepted: "
    "ShareGPT (`conversations`), OpenAI (`messages`) or Alpaca (`instruction`/`output`) records "
    "as .json or .jsonl; a LLaMA-Factory folder as a .zip with `dataset_info.json` (e.g. "
    "`train.json` + `eval.json`); or a .csv/.tsv with a text and a label column. Up to {mib} MiB. "
    "Then `/finetune start lr=5e-6 …` trains on the latest upload of the channel."
)


def _upload(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    mib = ctx.settings.max_upload_bytes // (1024 * 1024)
    respond(text=UPLOAD_HELP.format(mib=mib), response_type="ephemeral")


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
    channel = command["channel_id"]
    if not args:  # the form: every setting with its default, a dataset picker, a file input
        from bot.views import start_modal

        with new_session(ctx.db) as session:
            datasets = list_datasets(session, limit=100)
            latest = latest_dataset(session, channel_id=channel)
        client.views_open(
            trigger_id=command["trigger_id"],
            view=start_modal(
                datasets, channel_id=channel, default_dataset_id=latest.id if latest else None
            ),
        )
        return
    name = next((a.split("=", 1)[1] for a in args if a.startswith("dataset=")), None)
    config = parse_train_args([a for a in args if not a.startswith("dataset=")])
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
    queue_job(ctx, client, dataset=dataset, config=config, user=command["user_id"], channel=channel)


def queue_job(
    ctx: BotContext, client: Any, *, dataset: Dataset, config: TrainConfig, user: str, channel: str
) -> Job:
    """Queue a training job and post its root message, whose ts becomes the job's thread."""
    with new_session(ctx.db) as session:
        job = create_job(
            session,
            base_model=ctx.base_model,
            dataset_id=dataset.id,
            config=config.model_dump(exclude_defaults=True),
            requested_by=user,
            channel_id=channel,
        )
        return _post_root(session, client, job, dataset, "Fine-tuning job")


def _post_root(session: Any, client: Any, job: Job, dataset: Dataset | None, noun: str) -> Job:
    """Post a queued job's root message; its ts becomes the job's thread."""
    posted = client.chat_postMessage(
        channel=job.channel_id,
        text=f"{noun} {job.id} queued",
        blocks=job_header_blocks(job, dataset),
    )
    job.thread_ts = posted["ts"]
    session.add(job)
    session.commit()
    return job


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


def _require_approver(ctx: BotContext, user: str, what: str) -> None:
    if not ctx.approvers.allows(user):
        raise Forbidden(f"only approvers can {what}")


def _promote(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    if not args or not args[0].isdigit():
        respond(
            text="Which checkpoint? `/finetune promote <checkpoint>`", response_type="ephemeral"
        )
        return
    user = command["user_id"]
    _require_approver(ctx, user, "promote a checkpoint")
    result = call_serving(
        ctx.settings, "POST", "/v1/adapters/promote", {"checkpoint_id": int(args[0]), "by": user}
    )
    respond(
        text=f":white_check_mark: <@{user}> promoted checkpoint {args[0]}: `/classify` now "
        f"answers with it (swap {result.get('swap_ms')} ms).",
        response_type="in_channel",
    )


def _rollback(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    """Show what serves and what would serve after the rollback, with a button to confirm
    (bot/actions.py rolls back on the click, checking the approver and the target again)."""
    user = command["user_id"]
    _require_approver(ctx, user, "roll back")
    if args and (len(args) != 2 or args[0] != "to" or not (args[1].isdigit() or args[1] == "base")):
        raise ConfigError(
            f"`{' '.join(args)}`: use `/finetune rollback` (one step back), "
            "`/finetune rollback to <checkpoint>` or `/finetune rollback to base`"
        )
    query = f"?to={args[1]}" if args else ""
    plan = call_serving(ctx.settings, "GET", f"/v1/adapters/rollback{query}")
    respond(
        blocks=rollback_confirm_blocks(plan),
        text=f"Roll back from {served_name(plan.get('current'))} to "
        f"{served_name(plan.get('target'))}?",
        response_type="ephemeral",
    )


def _compare(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    from storage.evaluations import latest_evaluation
    from storage.models import Checkpoint, Evaluation

    if len(args) != 2:
        respond(
            text="Compare what? `/finetune compare <checkpoint|base> <checkpoint|base>`",
            response_type="ephemeral",
        )
        return
    with new_session(ctx.db) as session:
        anchor = next((session.get(Checkpoint, int(a)) for a in args if a.isdigit()), None)
        if anchor is None:
            raise NotFound("name at least one checkpoint number to compare")
        job = session.get(Job, anchor.job_id)
        dataset_id = job.dataset_id if job is not None else None
        rows: list[tuple[str, dict[str, Any]]] = []
        for arg in args:
            if arg == "base":
                found: Evaluation | None = latest_evaluation(
                    session,
                    dataset_id=dataset_id or -1,
                    base_model=anchor.base_model,
                    checkpoint_id=None,
                )
            elif arg.isdigit():
                found = session.exec(
                    select(Evaluation)
                    .where(Evaluation.checkpoint_id == int(arg))
                    .order_by(col(Evaluation.id).desc())
                ).first()
            else:
                raise NotFound(f"`{arg}` is neither a checkpoint number nor `base`")
            if found is None:
                raise NotFound(f"{arg} has no evaluation yet")
            rows.append((arg if arg == "base" else f"ckpt {arg}", found.metrics))
    respond(text=compare_text(rows), response_type="ephemeral")


def _export(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    from runner.export import check_export
    from storage.artifacts import ArtifactStore

    if not args or not args[0].isdigit():
        respond(
            text="Which checkpoint? `/finetune export <checkpoint> [bits=8|4]`",
            response_type="ephemeral",
        )
        return
    bits: int | None = None
    for arg in args[1:]:
        key, _, value = arg.partition("=")
        if key != "bits" or value not in ("4", "8"):
            raise ConfigError(f"`{arg}`: the only export setting is bits=8 or bits=4")
        bits = int(value)
    user, channel = command["user_id"], command["channel_id"]
    _require_approver(ctx, user, "export a model")
    store = ArtifactStore(ctx.settings.artifact_dir)
    with new_session(ctx.db) as session:
        checkpoint = check_export(session, store, checkpoint_id=int(args[0]), bits=bits, here=False)
        trained = session.get(Job, checkpoint.job_id)
        job = create_job(
            session,
            kind=JobKind.export,
            base_model=checkpoint.base_model,
            dataset_id=trained.dataset_id if trained else None,
            config={"checkpoint_id": checkpoint.id, **({"bits": bits} if bits else {})},
            requested_by=user,
            channel_id=channel,
        )
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        _post_root(session, client, job, dataset, "Export job")


SUBCOMMANDS: dict[str, Callable[..., None]] = {
    "upload": _upload,
    "help": _help,
    "datasets": _datasets,
    "start": _start,
    "status": _status,
    "list": _list,
    "cancel": _cancel,
    "compare": _compare,
    "promote": _promote,
    "rollback": _rollback,
    "export": _export,
}


def register_classify(app: Any, ctx: BotContext) -> None:
    @app.command("/classify")
    def handle_classify(ack: Callable[..., None], command: dict[str, Any], respond: Any) -> None:
        ack()
        words = (command.get("text") or "").split()
        model = None
        if len(words) >= 2 and words[0] == "--model":
            model = words[1] if not words[1].isdigit() else f"checkpoint-{words[1]}"
            words = words[2:]
        text = " ".join(words).strip()
        if not text:
            respond(
                text="What should I classify? `/classify <text>` (optionally `--model base` "
                "or `--model <checkpoint>` first)",
                response_type="ephemeral",
            )
            return
        try:
            answer = call_serving(
                ctx.settings, "POST", "/v1/classify", {"text": text, "model": model}
            )
        except FinetuneError as exc:
            respond(text=f":warning: {exc.message}", response_type="ephemeral")
            return
        respond(
            blocks=classify_blocks(text, answer),
            text=str(answer.get("label")),
            response_type="in_channel",
        )


def register_views(app: Any, ctx: BotContext) -> None:
    import json

    from bot.views import CALLBACK_ID, EXTRA_BLOCK, parse_submission
    from core.errors import ConfigError

    @app.view(CALLBACK_ID)
    def handle_start_submission(
        ack: Callable[..., None], body: dict[str, Any], view: dict[str, Any], client: Any
    ) -> None:
        try:
            config, dataset_id, file_id = parse_submission(view["state"]["values"])
        except ConfigError as exc:  # shown next to the fields in the open modal
            ack(response_action="errors", errors=exc.fields or {EXTRA_BLOCK: exc.message})
            return
        ack()
        channel = json.loads(view.get("private_metadata") or "{}").get("channel_id")
        user = body["user"]["id"]
        dataset = None
        if file_id is not None:  # checked and stored by a runner; training is queued after it
            from bot.events import queue_upload

            queue_upload(
                ctx,
                client,
                file_id=file_id,
                channel=channel,
                user=user,
                then_train=config.model_dump(exclude_defaults=True),
            )
            return
        if dataset is None:
            with new_session(ctx.db) as session:
                dataset = (
                    session.get(Dataset, dataset_id)
                    if dataset_id is not None
                    else latest_dataset(session, channel_id=channel)
                )
        if dataset is None:
            client.chat_postEphemeral(
                channel=channel,
                user=user,
                text="Pick a dataset or upload one: none has been uploaded in this channel yet.",
            )
            return
        queue_job(ctx, client, dataset=dataset, config=config, user=user, channel=channel)
