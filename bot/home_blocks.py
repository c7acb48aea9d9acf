"""The App Home's Block Kit: a pure function of what bot/home.py read (``HomeData``), called by
the listeners, the notifier's refresher and tests alike.

Sections, top to bottom: a notice (the answer to the user's last click, when there is one), what
serves now, a "New fine-tune" button, running and queued jobs (Cancel for the requester and
approvers), and the last ten checkpoints as a leaderboard, ranked by macro-F1 (Promote for
approvers), and the five most recent sweeps (how many runs ended, the best run so far by
macro-F1). Each job and sweep row links to its thread, each checkpoint to its eval report (its
job's thread before it has one), where Slack gave a permalink (``HomeData.links``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bot.blocks import (
    STATE_EMOJI,
    channel_mention,
    confirm_dialog,
    cut,
    job_noun,
    model_display_name,
    progress_bar,
    promote_confirm,
)
from core.enums import CheckpointStatus
from storage.models import Checkpoint, Dataset, Job, Promotion

PROMOTE = "approve_checkpoint"  # the eval report's button: bot/actions.py decides both
CANCEL_JOB = "cancel_job"
NEW_JOB = "home_start_job"
HEADER_CHARS = 150  # Slack refuses a longer header block
MAX_JOBS = 15
MAX_CHECKPOINTS = 10
MAX_SWEEPS = 5


@dataclass(frozen=True)
class Viewer:
    """Whose home it is, and whether they are an approver (they see every channel's)."""

    user: str
    approver: bool
    approvers_unknown: bool = False  # Slack could not say: shown as a plain user, with a note


@dataclass
class Board:
    """One leaderboard row: a checkpoint, its job and dataset, its newest scores."""

    checkpoint: Checkpoint
    job: Job
    dataset: Dataset | None
    metrics: dict[str, Any] | None


@dataclass
class HomeData:
    base_model: str
    promotion: Promotion | None  # the newest promotion (None, or no checkpoint: the base model)
    serving_metrics: dict[str, Any] | None  # None also when the viewer does not see its channel
    serving_visible: bool
    active: list[tuple[Job, Dataset | None]] = field(default_factory=list)
    board: list[Board] = field(default_factory=list)
    now: datetime | None = None
    # (sweep id, its channel, runs ended, runs, finished, the best row's text or None)
    sweeps: list[tuple[int, str | None, int, int, bool, str | None]] = field(default_factory=list)
    # The message a row links to, by ``row_key``: (channel, ts, the link's words); and the links
    # Slack gave for them (``chat.getPermalink``, as mrkdwn): a row without one shows no link.
    refs: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)


def row_key(kind: str, row_id: int | None) -> str:
    """A home row's key in ``HomeData.refs`` and ``links``: ``job 3``, ``checkpoint 7``…"""
    return f"{kind} {row_id}"


def _linked(text: str, link: str | None) -> str:
    return f"{text} · {link}" if link else text


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _when(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC")


def _section(text: str, accessory: dict[str, Any] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "section", "text": {"type": "mrkdwn", "text": cut(text)}}
    if accessory is not None:
        block["accessory"] = accessory
    return block


def _header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": cut(text, HEADER_CHARS)}}


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": cut(text)}]}


def scores_text(metrics: dict[str, Any] | None) -> str:
    """Accuracy, macro-F1 and calibration (ECE), or that there are none.

    >>> scores_text({"accuracy": 0.9, "macro_f1": 0.85, "ece": 0.031})
    'accuracy 90.0% · macro-F1 85.0% · ECE 3.1%'
    >>> scores_text(None)
    'not evaluated'
    """
    if metrics is None:
        return "not evaluated"
    text = f"accuracy {_pct(metrics.get('accuracy'))} · macro-F1 {_pct(metrics.get('macro_f1'))}"
    ece = metrics.get("ece")
    return text + (f" · ECE {_pct(ece)}" if isinstance(ece, int | float) else "")


def settings_text(job: Job) -> str:
    """A job's training settings as typed (defaults left out).

    >>> settings_text(Job(base_model="m", config={"num_train_epochs": 2, "learning_rate": 5e-6}))
    'learning_rate=5e-06, num_train_epochs=2'
    >>> settings_text(Job(base_model="m"))
    'defaults'
    """
    config = {k: v for k, v in (job.config or {}).items() if k != "checkpoint_id"}
    return ", ".join(f"{k}={v}" for k, v in sorted(config.items())) or "defaults"


def serving_block(data: HomeData) -> dict[str, Any]:
    """What serves now; a link to its eval report when the viewer sees it and Slack gave one."""
    promotion = data.promotion
    if promotion is None or promotion.checkpoint_id is None:
        since = (
            f" (rolled back by <@{promotion.decided_by}> at {_when(promotion.created_at)})"
            if promotion is not None
            else ""
        )
        return _section(
            f"*Serving now:* the base model `{model_display_name(data.base_model)}`{since}"
        )
    how = "promoted" if promotion.action == "promote" else "rolled back to"
    scores = (
        scores_text(data.serving_metrics)
        if data.serving_visible
        else "its scores belong to a channel you have no jobs in"
    )
    link = data.links.get(row_key("checkpoint", promotion.checkpoint_id))
    return _section(
        f"*Serving now:* checkpoint {promotion.checkpoint_id} · {scores}\n"
        + _linked(
            f"{how} by <@{promotion.decided_by}> at {_when(promotion.created_at)}",
            link if data.serving_visible else None,
        )
    )


def may_cancel(job: Job, viewer: Viewer) -> bool:
    return viewer.approver or (job.requested_by is not None and job.requested_by == viewer.user)


def job_block(
    job: Job, dataset: Dataset | None, viewer: Viewer, link: str | None = None
) -> dict[str, Any]:
    progress = job.progress or {}
    stopping = " · :octagonal_sign: stopping" if job.cancel_requested else ""
    lines = [
        f"{STATE_EMOJI.get(job.status, '')} *{job_noun(job)} {job.id}* · {job.status}{stopping}"
    ]
    if dataset is not None:
        lines.append(f"dataset *{dataset.name}* v{dataset.version} · {settings_text(job)}")
    if progress.get("total_steps"):
        lines.append(
            f"`{progress_bar(progress['step'], progress['total_steps'], width=12)}` step "
            f"{progress['step']}/{progress['total_steps']}"
        )
    who = f"<@{job.requested_by}>" if job.requested_by else "the deployment"
    lines.append(_linked(f"by {who} in {channel_mention(job.channel_id)}", link))
    button = None
    if may_cancel(job, viewer) and not job.cancel_requested:
        button = {
            "type": "button",
            "action_id": CANCEL_JOB,
            "style": "danger",
            "text": {"type": "plain_text", "text": "Cancel"},
            "value": str(job.id),
            "confirm": confirm_dialog(
                "Cancel this job?",
                f"{job_noun(job)} {job.id} stops; a training job keeps its last checkpoint.",
                "Cancel the job",
            ),
        }
    return _section("\n".join(lines), button)


def may_promote(row: Board, viewer: Viewer) -> bool:
    """Approvers, on an evaluated candidate (others need `/finetune promote N force`)."""
    return (
        viewer.approver
        and row.checkpoint.status == CheckpointStatus.candidate
        and row.metrics is not None
    )


def ranked(board: list[Board]) -> list[Board]:
    """The leaderboard's order: by macro-F1, then accuracy, the newest first on a tie; the
    checkpoints never evaluated last.

    >>> rows = [Board(Checkpoint(id=i, job_id=1, step=1, path="p", base_model="m"), Job(
    ...     base_model="m"), None, m) for i, m in enumerate([None, {"macro_f1": 0.5}, {"macro_f1": 0.7}])]
    >>> [row.checkpoint.id for row in ranked(rows)]
    [2, 1, 0]
    """

    def key(row: Board) -> tuple[bool, float, float, int]:
        metrics = row.metrics or {}
        return (
            row.metrics is None,
            -float(metrics.get("macro_f1") or 0.0),
            -float(metrics.get("accuracy") or 0.0),
            -(row.checkpoint.id or 0),
        )

    return sorted(board, key=key)


def checkpoint_block(
    row: Board, viewer: Viewer, *, serving: bool, rank: int | None = None, link: str | None = None
) -> dict[str, Any]:
    checkpoint, job, dataset = row.checkpoint, row.job, row.dataset
    now = " · :arrow_forward: *serving now*" if serving else ""
    data = f"*{dataset.name}* v{dataset.version}" if dataset is not None else "no dataset"
    place = f"{rank}. " if rank is not None else ""
    text = (
        f"{place}*checkpoint {checkpoint.id}* · {checkpoint.status}{now}\n"
        f"{scores_text(row.metrics)}\n"
        + _linked(
            f"{data} · {settings_text(job)} · job {job.id} in {channel_mention(job.channel_id)}",
            link,
        )
    )
    button = None
    if may_promote(row, viewer):
        button = {
            "type": "button",
            "action_id": PROMOTE,
            "style": "primary",
            "text": {"type": "plain_text", "text": "Promote"},
            "value": str(checkpoint.id),
            "confirm": promote_confirm(checkpoint.id or 0),
        }
    return _section(text, button)


def scope_words(viewer: Viewer) -> str:
    if viewer.approver:
        return "You are an approver: this home shows every channel's jobs and checkpoints."
    note = (
        " (Slack could not say whether you are an approver, so it shows what anyone sees.)"
        if viewer.approvers_unknown
        else ""
    )
    return (
        "This home shows the jobs you started and their checkpoints (in any channel), and the "
        "deployment's; a channel's other jobs are in that channel (`/finetune list`)." + note
    )


def home_view(data: HomeData, viewer: Viewer, *, notice: str | None = None) -> dict[str, Any]:
    """The ``views.publish`` view: at most 4 + 15 + 10 + 8 blocks, each within Slack's limits."""
    blocks: list[dict[str, Any]] = []
    if notice:
        blocks.append(_section(notice))
    blocks.append(serving_block(data))
    blocks.append(
        {
            "type": "actions",
            "block_id": "home_new_job",
            "elements": [
                {
                    "type": "button",
                    "action_id": NEW_JOB,
                    "style": "primary",
                    "text": {"type": "plain_text", "text": "New fine-tune"},
                    "value": "start",
                }
            ],
        }
    )
    blocks += [{"type": "divider"}, _header("Running and queued")]
    if data.active:
        blocks += [
            job_block(job, dataset, viewer, data.links.get(row_key("job", job.id)))
            for job, dataset in data.active[:MAX_JOBS]
        ]
    else:
        blocks.append(_context("Nothing is running or queued."))
    blocks += [{"type": "divider"}, _header("Latest checkpoints, best macro-F1 first")]
    serving = data.promotion.checkpoint_id if data.promotion is not None else None
    if data.board:
        blocks += [
            checkpoint_block(
                row,
                viewer,
                serving=row.checkpoint.id == serving,
                rank=place if row.metrics is not None else None,
                link=data.links.get(row_key("checkpoint", row.checkpoint.id)),
            )
            for place, row in enumerate(ranked(data.board[:MAX_CHECKPOINTS]), start=1)
        ]
    else:
        blocks.append(_context("No checkpoints yet."))
    if data.sweeps:
        blocks += [{"type": "divider"}, _header("Recent sweeps")]
        for sweep_id, channel, ended, runs, finished, best in data.sweeps[:MAX_SWEEPS]:
            where = f" in {channel_mention(channel)}" if channel else ""
            state = "finished" if finished else f"{ended}/{runs} runs ended"
            line = f":test_tube: *Sweep {sweep_id}*{where} · {state}"
            if best:
                line += f" · best: {best}"
            blocks.append(_section(_linked(line, data.links.get(row_key("sweep", sweep_id)))))
    updated = f"Updated {_when(data.now)}. " if data.now is not None else ""
    blocks.append(_context(updated + scope_words(viewer)))
    return {"type": "home", "blocks": blocks}


def home_fallback_view(text: str) -> dict[str, Any]:
    """What is published when Slack refused the full home: one plain section."""
    return {"type": "home", "blocks": [_section(text)]}


def home_text(view: dict[str, Any]) -> str:
    """A home's text, as the plain-text fallback and the console show it."""
    lines = []
    for block in view.get("blocks", []):
        if block.get("type") == "section":
            lines.append(block["text"]["text"])
        elif block.get("type") == "header":
            lines.append(f"*{block['text']['text']}*")
        elif block.get("type") == "context":
            lines.append(" · ".join(e.get("text", "") for e in block["elements"]))
    return "\n".join(lines)
