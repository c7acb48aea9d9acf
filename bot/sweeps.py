"""``/finetune sweep``: several training runs over a grid of settings, compared in one thread.

``/finetune sweep [dataset=<name>] lr=1e-5,5e-5,1e-4 [epochs=2,3] [k=v …]`` queues the cartesian
product (runner.sweep.parse_sweep: each value checked, more than ``SWEEP_MAX_RUNS`` refused with
the count) as one sweep. Its root message is the comparison table (each run's state, final loss,
accuracy, macro-F1, ECE, tokens/s), which the notifier edits in place as the runs progress instead
of a job header; the runs' milestones and evaluation reports go to the thread. When the last run
ends, the thread gets the overlaid loss curves and the scores by setting, and the root marks the
best run by macro-F1 with **Approve & promote best** (the report's ``approve_checkpoint`` action:
approvers only, checked server-side). ``/finetune sweep cancel <sweep>`` cancels every run (its
requester or an approver).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from slack_sdk.errors import SlackApiError
from sqlmodel import Session

from bot.blocks import confirm_dialog, cut, model_display_name, promote_confirm
from bot.job_commands import (
    ARCHIVED,
    NOT_A_MEMBER,
    ChannelUnwritable,
    cancel_unposted,
    check_user_limits,
    dataset_for,
    split_dataset_arg,
)
from core.enums import JobStatus
from core.errors import Conflict, FinetuneError, Forbidden
from runner.config import parse_train_args
from runner.sweep import parse_sweep, run_configs
from storage.db import new_session
from storage.models import Dataset, Job, Sweep
from storage.sweeps import (
    SweepRow,
    best_row,
    cancel_sweep,
    create_sweep,
    get_sweep,
    set_sweep_thread,
    sweep_jobs,
    sweep_rows,
)

if TYPE_CHECKING:
    from bot.commands import BotContext

log = logging.getLogger(__name__)

CANCEL_SWEEP = "cancel_sweep"

STATE = {
    "queued": ":hourglass:",
    "running": ":runner:",
    "evaluating": ":bar_chart:",
    "succeeded": ":white_check_mark:",
    "failed": ":x:",
    "cancelled": ":no_entry_sign:",
}


def sweep(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    channel, user = command["channel_id"], command["user_id"]
    if args and args[0] == "cancel":
        _cancel(ctx, channel, user, args[1:], respond)
        return
    if not args:
        respond(
            text="What should the sweep try? `/finetune sweep [dataset=<name>] "
            "lr=1e-5,5e-5,1e-4 [epochs=2,3] [key=value …]`: every combination of the comma "
            f"lists is one run (at most {ctx.settings.sweep_max_runs}).",
            response_type="ephemeral",
        )
        return
    name, rest = split_dataset_arg(args)
    plan = parse_sweep(rest, max_runs=ctx.settings.sweep_max_runs)
    with new_session(ctx.db) as session:
        dataset = dataset_for(session, name, channel=channel)
        check_user_limits(session, ctx.settings, user=user)
        created, _ = create_sweep(
            session,
            base_model=ctx.base_model,
            dataset_id=dataset.id,
            grid=plan.grid,
            fixed=parse_train_args(plan.fixed).model_dump(exclude_defaults=True),
            runs=run_configs(plan),
            requested_by=user,
            channel_id=channel,
        )
        _post_root(session, client, created, dataset)


def _post_root(session: Session, client: Any, created: Sweep, dataset: Dataset) -> None:
    """Post the sweep's table; its ts becomes the thread of the sweep and of every run (which
    lets runners claim them). If Slack refuses, every run is cancelled and the user told why."""
    assert created.id is not None
    rows = sweep_rows(session, created)
    try:
        posted = client.chat_postMessage(
            channel=created.channel_id,
            text=f"Sweep {created.id} queued: {len(rows)} runs",
            blocks=sweep_blocks(created, rows, dataset),
        )
    except (SlackApiError, OSError) as exc:
        code = (
            str(exc.response.get("error") or "an error")
            if isinstance(exc, SlackApiError)
            else type(exc).__name__
        )
        for job in sweep_jobs(session, created.id):  # never claimable: no thread yet
            cancel_unposted(session, job, code)
        if code in NOT_A_MEMBER:
            fix = "invite me with `/invite @finetune-bot`, then start the sweep again"
        elif code in ARCHIVED:
            fix = "this channel is archived"
        else:
            fix = "start it again in a minute"
        raise ChannelUnwritable(
            f"I can't post in this channel (Slack: {code}): sweep {created.id} and its "
            f"{len(rows)} runs were cancelled, nothing ran; {fix}."
        ) from exc
    set_sweep_thread(session, sweep_id=created.id, thread_ts=posted["ts"])


def _cancel(ctx: BotContext, channel: str, user: str, args: list[str], respond: Any) -> None:
    if len(args) != 1 or not args[0].isdigit():
        respond(text="Which sweep? `/finetune sweep cancel <sweep>`", response_type="ephemeral")
        return
    respond(text=cancel_as(ctx, channel, user, int(args[0])), response_type="ephemeral")


def cancel_as(ctx: BotContext, channel: str, user: str, sweep_id: int) -> str:
    """Cancel the sweep's runs for ``user`` (its requester or an approver, checked here); the
    answer to show them. Forbidden/NotFound for anyone else or another channel's sweep."""
    with new_session(ctx.db) as session:
        found = get_sweep(session, sweep_id, channel_id=channel)
        if found.requested_by != user and not ctx.approvers.allows(user):
            raise Forbidden(
                f"only <@{found.requested_by}> (who started sweep {found.id}) or an approver "
                "can cancel it"
            )
        assert found.id is not None
        try:
            asked = cancel_sweep(session, sweep_id=found.id, by=user)
        except Conflict as exc:
            return exc.message
    return (
        f"Sweep {found.id}: cancel asked of {len(asked)} runs; finished ones keep their "
        "checkpoints."
    )


def register(app: Any, ctx: BotContext) -> None:
    @app.action(CANCEL_SWEEP)
    def handle_cancel(ack: Any, body: dict[str, Any], client: Any) -> None:
        ack()
        user, channel = body["user"]["id"], body["channel"]["id"]
        try:
            text = cancel_as(ctx, channel, user, int(body["actions"][0]["value"]))
        except FinetuneError as exc:
            text = f":lock: {exc.message}; nothing was changed."
        client.chat_postEphemeral(channel=channel, user=user, text=text)


# The root message ------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def row_line(row: SweepRow, best: SweepRow | None) -> str:
    loss = "–" if row.final_loss is None else f"{row.final_loss:.4f}"
    speed = "–" if row.tokens_per_s is None else f"{row.tokens_per_s:,.0f}"
    mark = " :star: *best*" if best is not None and row.job_id == best.job_id else ""
    return (
        f"{STATE.get(row.status, '')} job {row.job_id} · `{row.settings_text}` · {row.status} · loss "
        f"{loss} · acc {_pct(row.accuracy)} · F1 {_pct(row.macro_f1)} · ECE {_pct(row.ece)} · "
        f"{speed} tok/s{mark}"
    )


def best_text(row: SweepRow) -> str:
    """The best run in a few words: ``job 7 (`lr=5e-5`, macro-F1 81.0%)``."""
    return f"job {row.job_id} (`{row.settings_text}`, macro-F1 {_pct(row.macro_f1)})"


def sweep_blocks(
    found: Sweep, rows: list[SweepRow], dataset: Dataset | None
) -> list[dict[str, Any]]:
    """The sweep's root: a line per run, the best one marked once the sweep finished, with
    Approve & promote best (approvers; checked when clicked)."""
    done = sum(JobStatus(r.status).finished for r in rows)
    state = "finished" if found.finished_at else f"{done}/{len(rows)} runs ended"
    what = (
        f"*{dataset.name}* v{dataset.version}" if dataset is not None else "the dataset"
    ) + f" on `{model_display_name(found.base_model)}`"
    best = best_row(rows) if found.finished_at else None
    lines = [f":test_tube: *Sweep {found.id}* · {state} · {what}"]
    lines += [row_line(r, best) for r in rows]
    fixed = ", ".join(f"{k}={v}" for k, v in sorted(found.fixed.items()))
    context = f"requested by <@{found.requested_by}>" if found.requested_by else "requested"
    if fixed:
        context += f" · every run: {fixed}"
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": cut("\n".join(lines))}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": cut(context)}]},
    ]
    if not found.finished_at and done < len(rows):
        blocks.append(
            {
                "type": "actions",
                "block_id": "sweep",
                "elements": [
                    {
                        "type": "button",
                        "action_id": CANCEL_SWEEP,
                        "style": "danger",
                        "text": {"type": "plain_text", "text": "Cancel sweep"},
                        "value": str(found.id),
                        "confirm": confirm_dialog(
                            "Cancel the sweep?",
                            f"Every run of sweep {found.id} that has not ended stops; finished "
                            "runs keep their checkpoints.",
                            "Cancel every run",
                        ),
                    }
                ],
            }
        )
    if best is not None and best.checkpoint_id is not None:
        blocks.append(
            {
                "type": "actions",
                "block_id": "decision",
                "elements": [
                    {
                        "type": "button",
                        "action_id": "approve_checkpoint",
                        "style": "primary",
                        "text": {"type": "plain_text", "text": "Approve & promote best"},
                        "value": str(best.checkpoint_id),
                        "confirm": promote_confirm(
                            best.checkpoint_id,
                            f"Checkpoint {best.checkpoint_id} (job {best.job_id}, "
                            f"`{best.settings_text}`, macro-F1 {_pct(best.macro_f1)})",
                        ),
                    }
                ],
            }
        )
    return blocks


def root_blocks_for(session: Session, job: Job) -> tuple[str, list[dict[str, Any]]]:
    """What the notifier puts in a sweep run's root message: the whole sweep's table."""
    assert job.sweep_id is not None
    found = get_sweep(session, job.sweep_id)
    rows = sweep_rows(session, found)
    dataset = session.get(Dataset, found.dataset_id) if found.dataset_id else None
    return sweep_text(found, rows), sweep_blocks(found, rows, dataset)


def sweep_text(found: Sweep, rows: list[SweepRow]) -> str:
    """The sweep root's notification text: how far it is, and its best run once finished."""
    if not found.finished_at:
        done = sum(JobStatus(r.status).finished for r in rows)
        return f"Sweep {found.id}: running, {done}/{len(rows)} runs ended"
    best = best_row(rows)
    return f"Sweep {found.id}: finished, " + (
        f"best run {best_text(best)}" if best is not None else "no run was evaluated"
    )
