"""The eval report's buttons (and the App Home's Promote, the same action) and the rollback
confirmation's. Only approvers decide (checked here, whatever the message or home shows); a
decision replaces the buttons with who decided and when; a second
click (or a retried request) changes nothing more: a stale rollback confirmation is refused by
serving with what serves now. Show mistakes decides nothing: anyone in the channel may click it,
and it shows only an evaluation the channel sees (bot/mistakes.py), in the thread it was clicked
in, a page at a time."""

from __future__ import annotations

import json
import logging
from typing import Any

from slack_sdk.errors import SlackApiError

from bot.answer_blocks import mistakes_blocks, mistakes_text
from bot.blocks import SHOW_MISTAKES, decided_blocks, rolled_back_text, served_name
from bot.commands import BotContext
from bot.mistakes import evaluation_mistakes
from bot.scope import Scope
from bot.serving_client import call_serving
from core.enums import CheckpointStatus
from core.errors import FinetuneError
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.models import Checkpoint, Job
from storage.promotions import AlreadyDecided, promotion_problem, reject_checkpoint
from storage.types import utcnow

log = logging.getLogger(__name__)


def register(app: Any, ctx: BotContext) -> None:
    @app.action("approve_checkpoint")
    def handle_approve(ack: Any, body: dict[str, Any], client: Any) -> None:
        ack()
        _decide(ctx, body, client, approve=True)

    @app.action("reject_checkpoint")
    def handle_reject(ack: Any, body: dict[str, Any], client: Any) -> None:
        ack()
        _decide(ctx, body, client, approve=False)

    @app.action("confirm_rollback")
    def handle_confirm_rollback(ack: Any, body: dict[str, Any], client: Any, respond: Any) -> None:
        ack()
        _confirm_rollback(ctx, body, client, respond)

    @app.action(SHOW_MISTAKES)
    def handle_show_mistakes(ack: Any, body: dict[str, Any], client: Any) -> None:
        ack()
        _show_mistakes(ctx, body, client)

    @app.action("cancel_rollback")
    def handle_cancel_rollback(ack: Any, body: dict[str, Any], respond: Any) -> None:
        ack()
        _replace_confirmation(body, respond, "Rollback cancelled; nothing was changed.")


def _decide(ctx: BotContext, body: dict[str, Any], client: Any, *, approve: bool) -> None:
    """Approve (serving promotes and records) or Reject (storage sets candidate → rejected),
    from the eval report in a channel or (Promote) from the App Home. Both compare and set on
    the checkpoint row, so of two approvers clicking at once one wins and the other is told what
    happened instead."""
    from bot.home import in_home, show_home

    user = body["user"]["id"]
    value = str(body["actions"][0].get("value") or "")
    if not value.isdigit():  # not a button this bot made
        log.warning("a decision button with value %r from %s", value[:40], user)
        if in_home(body):
            show_home(ctx, client, user, notice=":warning: That button names no checkpoint.")
        else:
            client.chat_postEphemeral(
                channel=body["channel"]["id"],
                user=user,
                text=":warning: That button names no checkpoint; nothing was changed.",
            )
        return
    checkpoint_id = int(value)
    if in_home(body):  # told at the top of the home, published again with the outcome
        told: list[str] = []
        # Only approvers get past _decided's first check, and they may reach every channel.
        done = _decided(
            ctx,
            user,
            checkpoint_id,
            told.append,
            scope=Scope("", everywhere=True),
            approve=approve,
            home=True,
        )
        when = utcnow().strftime("%Y-%m-%d %H:%M UTC")
        verdict = (
            f":white_check_mark: You promoted checkpoint {checkpoint_id} at {when}: "
            "`/classify` now answers with it."
            if approve
            else f":no_entry: You rejected checkpoint {checkpoint_id} at {when}."
        )
        notice = verdict if done else told[-1]
        show_home(ctx, client, user, notice=notice)
        return
    channel = body["channel"]["id"]
    message = body.get("message") or {}

    def tell(text: str) -> None:
        client.chat_postEphemeral(channel=channel, user=user, text=text)

    if not _decided(ctx, user, checkpoint_id, tell, scope=Scope(channel), approve=approve):
        return
    when = utcnow().strftime("%Y-%m-%d %H:%M UTC")
    verdict = (
        f":white_check_mark: Approved and promoted by <@{user}> at {when}: "
        "`/classify` now answers with this checkpoint."
        if approve
        else f":no_entry: Rejected by <@{user}> at {when}."
    )
    try:
        client.chat_update(
            channel=channel,
            ts=message.get("ts"),
            text=verdict,
            blocks=decided_blocks(message.get("blocks") or [], verdict),
        )
    except SlackApiError as exc:  # decided all the same: say so to the one who clicked
        code = exc.response.get("error")
        log.warning("could not mark checkpoint %d's report decided: %s", checkpoint_id, code)
        tell(f"{verdict} (Slack refused to update the report's message: {code}.)")


def _decided(
    ctx: BotContext,
    user: str,
    checkpoint_id: int,
    tell: Any,
    *,
    scope: Scope,
    approve: bool = True,
    home: bool = False,
) -> bool:
    """Whether ``user`` promoted (``approve``) or rejected the checkpoint; why not is told.
    ``home``: the App Home lists any checkpoint, so one that needs ``force`` is refused too."""
    if not _approver(ctx, user, tell, "promote or reject a checkpoint"):
        return False
    with new_session(ctx.db) as session:
        checkpoint = session.get(Checkpoint, checkpoint_id)
        job = session.get(Job, checkpoint.job_id) if checkpoint is not None else None
        if checkpoint is None or not scope.sees(job.channel_id if job else None):
            tell(f"Checkpoint {checkpoint_id} no longer exists.")
            return False
        if checkpoint.status != CheckpointStatus.candidate:
            tell(_already(checkpoint_id, checkpoint.status, checkpoint.decided_by))
            return False
        problem = promotion_problem(session, checkpoint=checkpoint) if home else None
        if problem is not None:
            tell(
                f":warning: {problem}; nothing was changed (`/finetune promote {checkpoint_id} "
                "force` in a channel promotes it anyway)."
            )
            return False
        try:
            if approve:
                call_serving(
                    ctx.settings,
                    "POST",
                    "/v1/adapters/promote",
                    {"checkpoint_id": checkpoint_id, "by": user},
                )
            else:
                reject_checkpoint(session, checkpoint_id=checkpoint_id, decided_by=user)
        except AlreadyDecided as exc:  # promoted since the status was read
            tell(_already(checkpoint_id, exc.status, exc.decided_by))
            return False
        except FinetuneError as exc:
            now = session.get(Checkpoint, checkpoint_id, populate_existing=True)
            if approve and now is not None and now.status == CheckpointStatus.rejected:
                tell(_already(checkpoint_id, now.status, now.decided_by))  # rejected meanwhile
            else:
                tell(f":warning: {exc.message}")
            return False
    log.info(
        "checkpoint %d %s by %s",
        checkpoint_id,
        "promoted" if approve else "rejected",
        user,
        extra={"event": "decision", "checkpoint_id": checkpoint_id, "by": user},
    )
    return True


def _show_mistakes(ctx: BotContext, body: dict[str, Any], client: Any) -> None:
    """A page of an evaluation's mistakes as a reply in the thread of the clicked message (the
    report's, or the previous page's); a refusal, or why there is nothing to list, is told to
    the user alone and nothing is posted."""
    user = body["user"]["id"]
    channel = body["channel"]["id"]

    def tell(text: str) -> None:
        client.chat_postEphemeral(channel=channel, user=user, text=text)

    try:
        shown = json.loads(body["actions"][0]["value"])
        evaluation_id, offset = int(shown["evaluation_id"]), max(int(shown.get("offset", 0)), 0)
    except (ValueError, KeyError, TypeError):
        tell(":warning: That button does not name an evaluation; nothing to show.")
        return
    try:
        with new_session(ctx.db) as session:
            found = evaluation_mistakes(
                session, ArtifactStore(ctx.settings.artifact_dir), Scope(channel), evaluation_id
            )
    except FinetuneError as exc:
        tell(f":warning: {exc.message}")
        return
    message = body.get("message") or {}
    container = body.get("container") or {}
    thread = message.get("thread_ts") or container.get("thread_ts") or message.get("ts")
    client.chat_postMessage(
        channel=channel,
        thread_ts=thread,
        text=mistakes_text(found.wrong, subject=found.subject, offset=offset),
        blocks=mistakes_blocks(
            found.wrong,
            evaluation_id=evaluation_id,
            subject=found.subject,
            offset=offset,
            total=found.total,
        ),
    )
    if offset and message.get("blocks"):  # a More mistakes click: that page's button is spent
        _drop_more_button(client, channel, message)


def _drop_more_button(client: Any, channel: str, page: dict[str, Any]) -> None:
    kept = [
        b
        for b in page["blocks"]
        if not any(e.get("action_id") == SHOW_MISTAKES for e in b.get("elements", []))
    ]
    try:
        client.chat_update(
            channel=channel, ts=page.get("ts"), text=page.get("text") or "Mistakes", blocks=kept
        )
    except SlackApiError as exc:  # the next page is posted; a button left behind is harmless
        log.warning("could not remove a spent More mistakes button: %s", exc.response.get("error"))


def _already(checkpoint_id: int, status: str, decided_by: str | None) -> str:
    by = f" by <@{decided_by}>" if decided_by else ""
    return f"Checkpoint {checkpoint_id} was already {status}{by}; nothing was changed."


def _replace_confirmation(body: dict[str, Any], respond: Any, text: str) -> None:
    """Replace the ephemeral rollback confirmation (only its response_url reaches it)."""
    if body.get("response_url"):
        respond(text=text, replace_original=True)


def _confirm_rollback(ctx: BotContext, body: dict[str, Any], client: Any, respond: Any) -> None:
    """The confirm button of ``/finetune rollback``: approvers only (checked again here), and
    serving refuses (409) when what serves changed since the confirmation was shown."""
    user = body["user"]["id"]
    channel = body["channel"]["id"]

    def tell(text: str) -> None:
        client.chat_postEphemeral(channel=channel, user=user, text=text)

    if not _approver(ctx, user, tell, "roll back"):
        return
    try:
        shown = json.loads(body["actions"][0]["value"])
        target = {"to": shown["to"], "expected_current": shown["expected_current"]}
    except (ValueError, KeyError, TypeError):
        tell(":warning: That button does not say what to roll back to; nothing was changed.")
        return
    try:
        result = call_serving(
            ctx.settings,
            "POST",
            "/v1/adapters/rollback",
            {"by": user, **target},
        )
    except FinetuneError as exc:
        tell(f":warning: {exc.message}")
        return
    text = rolled_back_text(user, result)
    _replace_confirmation(body, respond, text)
    client.chat_postMessage(channel=channel, text=text)
    log.info(
        "rolled back to %s by %s",
        served_name(result.get("current")),
        user,
        extra={"event": "rollback", "by": user, **target},
    )


def _approver(ctx: BotContext, user: str, tell: Any, what: str) -> bool:
    """Whether ``user`` may ``what``, checked here, on the server, for every click; a refusal (or
    a Slack that cannot say who the approvers are) is told to the user alone."""
    try:
        allowed = ctx.approvers.allows(user)
    except FinetuneError as exc:
        tell(f":warning: {exc.message}")
        return False
    if not allowed:
        tell(f":lock: Only approvers can {what}; nothing was changed.")
    return allowed
