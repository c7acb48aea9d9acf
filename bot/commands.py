"""``/finetune``: the dispatcher and the help. Every handler acks at once; the answer follows
through ``respond`` (ephemeral unless the channel should see it) or a channel message. Domain
errors become user text here, in ``handle_finetune``, and only here.

The subcommands live by what they deal with: bot/dataset_commands.py (upload, datasets, share,
unshare), bot/job_commands.py (start, status, list, cancel, evaluate, export; queueing a job and
its root message), bot/checkpoint_commands.py (checkpoints, compare, promote, rollback),
bot/distill_commands.py (distill). Channels
are tenants (bot/scope.py): each command sees this channel's jobs and datasets; approvers end a
command with ``all`` to see every channel's.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from bot import (
    checkpoint_commands,
    dataset_commands,
    distill_commands,
    feedback,
    job_commands,
    sweeps,
)
from bot.answer_blocks import classify_blocks, classify_text
from bot.auth import Approvers
from bot.home import HomeViewers
from bot.job_commands import queue_job
from bot.permalinks import Permalinks
from bot.serving_client import call_serving
from core.errors import FinetuneError, NotFound
from core.settings import Settings
from runner.config import help_lines
from storage.datasets import latest_dataset
from storage.db import new_session
from storage.models import Dataset

log = logging.getLogger(__name__)

__all__ = ["BotContext", "queue_job", "register", "register_classify", "register_views"]

USAGE = {
    "help": "this message",
    "upload": "how to share a dataset file with the bot",
    "datasets [all]": "the datasets this channel can use: its own, those other channels "
    "shared, the deployment's (`all`: every channel's, approvers)",
    "share <name> / unshare <name>": "let every channel train on this channel's dataset, or "
    "stop (its uploader or an approver)",
    "start [dataset=<name>] [key=value …]": "queue a training job (the dataset defaults to the "
    "latest uploaded in this channel; a name means this channel's, else a shared one, else the "
    "deployment's)",
    "sweep [dataset=<name>] lr=1e-5,5e-5 [epochs=2,3] [key=value …]": "queue every combination "
    "of the comma lists as one sweep (at most `SWEEP_MAX_RUNS` runs), compared in one thread; the best "
    "run by macro-F1 can be promoted from it. `sweep cancel <sweep>` cancels every run",
    "distill dataset=<name> teacher=<url> model=<name> [tries=1-10] [name=<new>]": "have a "
    "teacher (an OpenAI-compatible endpoint this deployment allows: our serving, or "
    "`DISTILL_TEACHERS`) write the reasoning of a label-only dataset; only answers with the gold "
    "label are kept, as a new dataset version (approvers; the same command resumes a failed one)",
    "status [job]": "a job's state and progress",
    "list": "the latest jobs in this channel",
    "checkpoints": "this channel's latest checkpoints (id, job, step, state, scores) and what "
    "serves now",
    "cancel <job>": "stop a job, during training, evaluation or export (its requester or an "
    "approver)",
    "compare <a> <b>": "eval scores of two checkpoints (or `base`) side by side",
    "evaluate <checkpoint>": "score a checkpoint again, e.g. after a failed evaluation (the "
    "requester of its job or an approver); the report lands in the new job's thread",
    "promote <checkpoint> [force]": "serve a checkpoint (approvers); one never evaluated, or "
    "an intermediate one of a failed or cancelled job, needs `force`",
    "rollback [to <checkpoint>|to base]": "serve what served before the current checkpoint "
    "(or a checkpoint that served before); shows the target and asks to confirm (approvers)",
    "feedback": "this channel's corrections and 👍 of `/classify` answers: per label, and how "
    "often the model was right on the answers people judged",
    "feedback export [name] [confirmations=on]": "store the corrections (and 👍, if asked) no "
    "export took yet as the next version of dataset *name* (default `feedback`), train split "
    "only, written as the checkpoint was trained; then `start dataset=<name>`",
    "export <checkpoint> [bits=8|4 | format=gguf [quant=f16|q8_0|q4_0]]": "a standalone merged "
    "model, optionally quantized, or one GGUF file with an Ollama Modelfile, verified before it "
    "is announced (approvers)",
}
SCOPE_HELP = (
    "Jobs, checkpoints and datasets are per channel: another channel's are not found here. "
    "Approvers add `all` at the end (`status 12 all`, `list all`, `checkpoints all`, `compare 3 "
    "9 all`, `cancel 12 all`, `promote 9 all`, `datasets all`, …) to reach every channel's. "
    "Each user may have {queued} jobs queued and {running} running at once (approvers too)."
)


@dataclass
class BotContext:
    settings: Settings
    db: Engine
    approvers: Approvers
    base_model: str
    permalinks: Permalinks = field(default_factory=Permalinks)  # links Slack gave, cached
    home_viewers: HomeViewers = field(default_factory=HomeViewers)  # shared with the notifier


def usage_text(unknown: str | None = None, settings: Settings | None = None) -> str:
    head = f"Unknown subcommand `{unknown}`. " if unknown else ""
    lines = [f"{head}*`/finetune` subcommands:*"]
    lines += [f"• `/finetune {name}` — {what}" for name, what in USAGE.items()]
    if settings is not None:
        lines.append(
            SCOPE_HELP.format(
                queued=settings.user_max_queued_jobs, running=settings.user_max_running_jobs
            )
        )
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
                respond(text=usage_text(sub, ctx.settings), response_type="ephemeral")
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
    respond(text=usage_text(settings=ctx.settings), response_type="ephemeral")


SUBCOMMANDS: dict[str, Callable[..., None]] = {
    "help": _help,
    "upload": dataset_commands.upload,
    "datasets": dataset_commands.datasets,
    "share": dataset_commands.share,
    "unshare": dataset_commands.unshare,
    "start": job_commands.start,
    "sweep": sweeps.sweep,
    "distill": distill_commands.distill,
    "status": job_commands.status,
    "list": job_commands.list_jobs,
    "cancel": job_commands.cancel,
    "evaluate": job_commands.evaluate,
    "export": job_commands.export,
    "feedback": feedback.feedback,
    "checkpoints": checkpoint_commands.checkpoints,
    "compare": checkpoint_commands.compare,
    "promote": checkpoint_commands.promote,
    "rollback": checkpoint_commands.rollback,
}


CLASSIFY_USAGE = (
    "What should I classify? `/classify <text>` (optionally `--model base` or `--model "
    "<checkpoint>` first, and `reasoning=off` to answer without thinking first)"
)


def parse_classify(text: str) -> tuple[dict[str, Any], str | None]:
    """``/classify``'s words as serving's request, or a usage line for what it cannot take.

    >>> parse_classify("--model 7 reasoning=off 球队 夺冠")
    ({'text': '球队 夺冠', 'model': 'checkpoint-7', 'reasoning': 'off'}, None)
    >>> parse_classify("reasoning=maybe 球队夺冠")[1]
    '`reasoning=` takes `on` or `off`, not `maybe`'
    """
    words = text.split()
    request: dict[str, Any] = {"model": None}
    while words:
        if len(words) >= 2 and words[0] == "--model":
            request["model"] = words[1] if not words[1].isdigit() else f"checkpoint-{words[1]}"
            words = words[2:]
        elif words[0].lower().startswith("reasoning="):
            mode = words[0].split("=", 1)[1].lower()
            if mode not in ("on", "off"):
                return {}, f"`reasoning=` takes `on` or `off`, not `{mode}`"
            request["reasoning"] = mode
            words = words[1:]
        else:
            break
    asked = " ".join(words).strip()
    if not asked:
        return {}, CLASSIFY_USAGE
    return {"text": asked, **request}, None


def register_classify(app: Any, ctx: BotContext) -> None:
    @app.command("/classify")
    def handle_classify(ack: Callable[..., None], command: dict[str, Any], respond: Any) -> None:
        ack()
        request, problem = parse_classify(command.get("text") or "")
        if problem is not None:
            respond(text=problem, response_type="ephemeral")
            return
        try:
            answer = call_serving(ctx.settings, "POST", "/v1/classify", request)
            blocks = classify_blocks(
                request["text"], answer, threshold=_min_confidence(ctx, answer)
            )
        except FinetuneError as exc:
            respond(text=f":warning: {exc.message}", response_type="ephemeral")
            return
        except Exception:  # an answer this bot cannot show: said to the asker alone
            error_id = uuid.uuid4().hex[:8]
            log.exception("/classify failed (error id %s)", error_id)
            respond(
                text=f"Something went wrong (error id `{error_id}`); the bot's log has the "
                "details.",
                response_type="ephemeral",
            )
            return
        respond(blocks=blocks, text=classify_text(answer), response_type="in_channel")


def _min_confidence(ctx: BotContext, answer: dict[str, Any]) -> float | None:
    """The SERVING_MIN_CONFIDENCE an uncertain answer fell below: serving's own, as it answered
    it (``min_confidence``), else this process's setting (an older serving)."""
    value = answer.get("min_confidence", ctx.settings.serving_min_confidence)
    return float(value) if isinstance(value, int | float) else None


def register_views(app: Any, ctx: BotContext) -> None:
    import json

    from bot.views import CALLBACK_ID, CHANNEL_BLOCK, EXTRA_BLOCK, parse_submission
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
        channel = json.loads(view.get("private_metadata") or "{}").get("channel_id")
        user = body["user"]["id"]
        if CHANNEL_BLOCK in view["state"]["values"]:  # the home's form: a channel was picked
            channel, problem = _home_form_channel(ctx, view["state"]["values"], user=user)
            if problem is not None:
                ack(response_action="errors", errors={CHANNEL_BLOCK: problem})
                return
        ack()
        try:
            _start_from_form(ctx, client, config, dataset_id, file_id, channel=channel, user=user)
        except FinetuneError as exc:  # the form is closed: tell the user where they are
            tell_privately(client, channel=channel, user=user, text=f":warning: {exc.message}")


def _home_form_channel(
    ctx: BotContext, values: dict[str, Any], *, user: str
) -> tuple[str, str | None]:
    """The channel picked in the home's start form, and why it is refused: the bot cannot tell
    whether the user is in a channel, so it takes only those where they started jobs before."""
    from bot.home import user_channels
    from bot.views import picked_channel

    picked = picked_channel(values) or ""
    with new_session(ctx.db) as session:
        allowed = user_channels(session, user=user)
    if picked in allowed:
        return picked, None
    return picked, (
        "You have not started a job or shared a dataset in that channel yet: type "
        "`/finetune start` there once, and this form can start jobs there too."
    )


def _start_from_form(
    ctx: BotContext,
    client: Any,
    config: Any,
    dataset_id: int | None,
    file_id: str | None,
    *,
    channel: str,
    user: str,
) -> None:
    if file_id is not None:  # checked and stored by a runner; training is queued after it
        from bot.events import queue_upload
        from bot.job_commands import check_user_limits

        with new_session(ctx.db) as session:
            check_user_limits(session, ctx.settings, user=user)
        queue_upload(
            ctx,
            client,
            file_id=file_id,
            channel=channel,
            user=user,
            then_train=config.model_dump(exclude_defaults=True),
        )
        return
    with new_session(ctx.db) as session:
        dataset = (
            session.get(Dataset, dataset_id)
            if dataset_id is not None
            else latest_dataset(session, channel_id=channel)
        )
    if dataset is None:
        raise NotFound("pick a dataset or upload one: none has been uploaded in this channel yet")
    queue_job(ctx, client, dataset=dataset, config=config, user=user, channel=channel)


def tell_privately(client: Any, *, channel: str, user: str, text: str) -> None:
    """An answer only ``user`` sees, where no response URL exists (a form's submission): an
    ephemeral message in the channel, or a direct message where the bot cannot post there."""
    try:
        client.chat_postEphemeral(channel=channel, user=user, text=text)
    except Exception:
        log.warning("could not answer %s in %s ephemerally; sending a DM", user, channel)
        client.chat_postMessage(channel=user, text=text)
