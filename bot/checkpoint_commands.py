"""``/finetune checkpoints|compare|promote|rollback``: what was trained, how it scored, what
serves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlmodel import Session

from bot.blocks import (
    checkpoint_line,
    compare_text,
    model_display_name,
    rollback_confirm_blocks,
    served_name,
    text_blocks,
)
from bot.permalinks import mrkdwn_link, report_messages
from bot.scope import Scope, find_checkpoint, require_approver, scope_of
from bot.serving_client import call_serving
from core.enums import CheckpointStatus
from core.errors import ConfigError, Conflict, NotFound
from storage.db import new_session
from storage.evaluations import (
    checkpoint_evaluation,
    checkpoint_evaluations,
    current_promotion,
    latest_evaluation,
)
from storage.models import Checkpoint, Evaluation
from storage.promotions import list_checkpoints, promotion_problem

if TYPE_CHECKING:
    from bot.commands import BotContext

FORCE = "force"


def serving_now_text(session: Session, base_model: str) -> str:
    """What serves now, as storage records it (the newest promotion)."""
    promotion = current_promotion(session)
    if promotion is None or promotion.checkpoint_id is None:
        return f"*Serving now:* the base model `{model_display_name(base_model)}`"
    when = promotion.created_at.strftime("%Y-%m-%d %H:%M UTC")
    how = "promoted" if promotion.action == "promote" else "rolled back to"
    return (
        f"*Serving now:* checkpoint {promotion.checkpoint_id} ({how} by "
        f"<@{promotion.decided_by}> at {when})"
    )


def checkpoints(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    scope, args = scope_of(ctx.approvers, command, args)
    if args:
        raise ConfigError(f"`{' '.join(args)}`: use `/finetune checkpoints` (approvers: `all`)")
    with new_session(ctx.db) as session:
        rows = list_checkpoints(session, channel_id=scope.channel_filter, limit=15)
        scores = checkpoint_evaluations(
            session, checkpoint_ids=[c.id for c, _ in rows if c.id is not None]
        )
        promotion = current_promotion(session)
        serving = promotion.checkpoint_id if promotion is not None else None
        head = serving_now_text(session, ctx.base_model)
    lines = [head]
    if rows:
        lines.append(f"*Latest checkpoints {scope.where}:*")
        for checkpoint, job in rows:
            found = scores.get(checkpoint.id) if checkpoint.id is not None else None
            line = checkpoint_line(
                checkpoint,
                job,
                found.metrics if found is not None else None,
                serving=checkpoint.id == serving,
            )
            lines.append(f"• {line}")
        lines.append(
            "`/finetune compare <a> <b>` puts two side by side; `/finetune evaluate <checkpoint>` "
            "scores one again; `/finetune promote <checkpoint>` serves one (approvers)."
        )
    else:
        lines.append(f"No checkpoints {scope.where} yet.")
    text = "\n".join(lines)
    respond(blocks=text_blocks(text[:3000]), text=text, response_type="ephemeral")


def compare(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    scope, args = scope_of(ctx.approvers, command, args)
    if len(args) != 2:
        respond(
            text="Compare what? `/finetune compare <checkpoint|base> <checkpoint|base>`",
            response_type="ephemeral",
        )
        return
    with new_session(ctx.db) as session:
        rows = [(a if a == "base" else f"ckpt {a}", _scores(session, scope, args, a)) for a in args]
    respond(text=compare_text(rows), response_type="ephemeral")


def _scores(session: Session, scope: Scope, args: list[str], arg: str) -> dict[str, Any]:
    """The newest scores of checkpoint ``arg``, or of the base model (``base``) on the eval split
    of the first checkpoint named."""
    found: Evaluation | None
    if arg == "base":
        anchor_ref = next((a for a in args if a != "base"), None)
        if anchor_ref is None:
            raise NotFound("name at least one checkpoint number to compare")
        anchor, job = find_checkpoint(session, scope, anchor_ref)
        found = latest_evaluation(
            session,
            dataset_id=(job.dataset_id if job is not None else None) or -1,
            base_model=anchor.base_model,
            checkpoint_id=None,
        )
    elif arg.isdigit():
        checkpoint, _ = find_checkpoint(session, scope, arg)
        assert checkpoint.id is not None
        found = checkpoint_evaluation(session, checkpoint_id=checkpoint.id)
    else:
        raise NotFound(f"`{arg}` is neither a checkpoint number nor `base`")
    if found is None:
        raise NotFound(f"{arg} has no evaluation yet")
    return found.metrics


def promote(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    """Serve a checkpoint (approvers). One never evaluated, or an intermediate one of a failed or
    cancelled job, needs ``force``; a rejected one cannot be promoted."""
    user = command["user_id"]
    require_approver(ctx.approvers, user, "promote a checkpoint")
    forced = any(a.lower() == FORCE for a in args[1:])  # `force` and `all` in either order
    scope, args = scope_of(ctx.approvers, command, [a for a in args if a.lower() != FORCE])
    if not args or not args[0].isdigit():
        respond(
            text="Which checkpoint? `/finetune promote <checkpoint> [force]`",
            response_type="ephemeral",
        )
        return
    if len(args) > 1:
        raise ConfigError(
            f"`{' '.join(args[1:])}`: after the checkpoint, `/finetune promote` takes only "
            "`force` (and, for another channel's checkpoint, `all`)"
        )
    with new_session(ctx.db) as session:
        checkpoint, _ = find_checkpoint(session, scope, args[0])
        problem = _promotion_problem(session, checkpoint)
    if problem is not None and not forced:
        raise Conflict(
            f"{problem}; `/finetune evaluate {checkpoint.id}` scores it, or add `force` to "
            "promote it anyway"
        )
    result = call_serving(
        ctx.settings, "POST", "/v1/adapters/promote", {"checkpoint_id": checkpoint.id, "by": user}
    )
    assert checkpoint.id is not None
    with new_session(ctx.db) as session:
        where = report_messages(session, [checkpoint.id]).get(checkpoint.id)
    link = ctx.permalinks.link(client, *where) if where else None
    respond(
        text=f":white_check_mark: <@{user}> promoted checkpoint {checkpoint.id}"
        + (f" (forced: {problem})" if problem is not None else "")
        + f": `/classify` now answers with it (swap {result.get('swap_ms')} ms)."
        + (f" {mrkdwn_link(link, 'Its eval report')}." if link else ""),
        response_type="in_channel",
    )


def _promotion_problem(session: Session, checkpoint: Checkpoint) -> str | None:
    """Why the checkpoint needs ``force`` (None: it does not); Conflict if it was rejected."""
    if checkpoint.status == CheckpointStatus.rejected:
        by = f" by <@{checkpoint.decided_by}>" if checkpoint.decided_by else ""
        raise Conflict(f"checkpoint {checkpoint.id} was rejected{by}: it cannot be promoted")
    if checkpoint.status != CheckpointStatus.candidate:
        return None  # it served before (a rollback target); serving says if it serves now
    return promotion_problem(session, checkpoint=checkpoint)


def rollback(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    """Show what serves and what would serve after the rollback, with a button to confirm
    (bot/actions.py rolls back on the click, checking the approver and the target again)."""
    user = command["user_id"]
    require_approver(ctx.approvers, user, "roll back")
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
