"""Corrections become data: the "Wrong label?" select and the 👍 under a ``/classify`` answer, and
``/finetune feedback [export [name] [confirmations=on]]``.

Nothing a user types is stored until someone chooses on the answer: then the headline, the model's
label and confidence, the right label, who, when and which checkpoint are recorded, one row per
user and answer (a later choice replaces the earlier one). The click is checked here, whatever the
message says: the checkpoint must be one this channel sees (bot/scope.py) and both labels must be
in its label set. A channel sees and exports only its own feedback. Rows older than
``FEEDBACK_RETENTION_DAYS`` are deleted by the runner's hourly prune.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from bot.answer_blocks import CONFIRM_LABEL, CORRECT_LABEL
from bot.blocks import escape, pct
from bot.scope import Scope, find_checkpoint
from core.enums import FeedbackKind
from core.errors import FinetuneError, NotFound
from runner.datasets.feedback import DEFAULT_NAME, export_feedback
from runner.datasets.ingest import IngestOptions, check_dataset_name
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.feedback import channel_feedback, record_feedback
from storage.models import Feedback

if TYPE_CHECKING:
    from bot.commands import BotContext

log = logging.getLogger(__name__)

FEEDBACK_USAGE = (
    "`/finetune feedback` shows this channel's corrections and confirmations; `/finetune "
    "feedback export [name] [confirmations=on]` stores the new ones as the next version of "
    f"dataset *name* (default `{DEFAULT_NAME}`)"
)


def register(app: Any, ctx: BotContext) -> None:
    @app.action(CORRECT_LABEL)
    def handle_correct_label(ack: Any, body: dict[str, Any], client: Any) -> None:
        ack()
        chosen = (body["actions"][0].get("selected_option") or {}).get("value")
        _record(ctx, body, client, chosen=chosen)

    @app.action(CONFIRM_LABEL)
    def handle_confirm_label(ack: Any, body: dict[str, Any], client: Any) -> None:
        ack()
        _record(ctx, body, client, chosen=None)


def _answer_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """What the answer's 👍 carries: from the clicked button, or for the select from the 👍 in
    the same message (Slack sends the message with the click)."""
    action = body["actions"][0]
    raw = action.get("value") if action.get("action_id") == CONFIRM_LABEL else None
    if raw is None:
        for block in (body.get("message") or {}).get("blocks") or []:
            for element in block.get("elements") or []:
                if element.get("action_id") == CONFIRM_LABEL:
                    raw = element.get("value")
    try:
        shown = json.loads(raw or "")
        return {
            "text": str(shown["text"]),
            "label": str(shown["label"]),
            "confidence": float(shown["confidence"])
            if shown.get("confidence") is not None
            else None,
            "checkpoint_id": int(shown["checkpoint_id"]),
        }
    except (ValueError, KeyError, TypeError):
        return None


def _record(ctx: BotContext, body: dict[str, Any], client: Any, *, chosen: str | None) -> None:
    """Store the user's choice on the answer (``chosen`` None: the 👍), told to them alone."""
    user, channel = body["user"]["id"], body["channel"]["id"]
    shown_in = body.get("container") or {}
    message_ts = shown_in.get("message_ts") or (body.get("message") or {}).get("ts")

    def tell(text: str) -> None:
        client.chat_postEphemeral(channel=channel, user=user, text=text)

    answer = _answer_of(body)
    if answer is None or not message_ts:
        tell(":warning: That answer does not say what it answered; nothing was recorded.")
        return
    checkpoint_id, predicted = answer["checkpoint_id"], answer["label"]
    try:
        with new_session(ctx.db) as session:
            checkpoint, _ = find_checkpoint(session, Scope(channel), str(checkpoint_id))
            labels = set((checkpoint.meta or {}).get("labels") or ())
            right = predicted if chosen is None else chosen
            if predicted not in labels or right not in labels:
                raise NotFound(
                    f"`{escape(right)}` is not a label of checkpoint {checkpoint_id}"
                    if predicted in labels
                    else f"checkpoint {checkpoint_id} has no label `{escape(predicted)}`"
                )
            kind = FeedbackKind.confirmation if right == predicted else FeedbackKind.correction
            record_feedback(
                session,
                kind=kind,
                channel_id=channel,
                message_ts=str(message_ts),
                user_id=user,
                text=answer["text"],
                predicted_label=predicted,
                confidence=answer["confidence"],
                correct_label=right,
                checkpoint_id=checkpoint_id,
            )
    except FinetuneError as exc:
        tell(f":warning: {exc.message}; nothing was recorded.")
        return
    if kind == FeedbackKind.correction:
        said = (
            f"*{escape(right)}* is the right label (checkpoint {checkpoint_id} said "
            f"{escape(predicted)})"
        )
    else:
        said = f"checkpoint {checkpoint_id} got it right: *{escape(right)}*"
    tell(
        f":memo: Thanks, recorded: {said}. A later choice on this answer replaces it; "
        "`/finetune feedback` shows this channel's, `/finetune feedback export` makes a dataset "
        "of them."
    )
    log.info(
        "feedback on checkpoint %d by %s",
        checkpoint_id,
        user,
        extra={"event": "feedback", "kind": kind.value, "checkpoint_id": checkpoint_id},
    )


def feedback(ctx: BotContext, command: dict, args: list[str], respond: Any, client: Any) -> None:
    """``/finetune feedback`` and ``/finetune feedback export [name] [confirmations=on]``."""
    channel = command["channel_id"]
    if not args:
        with new_session(ctx.db) as session:
            rows = channel_feedback(session, channel_id=channel)
        respond(text=summary_text(rows), response_type="ephemeral")
        return
    if args[0].lower() != "export":
        respond(text=FEEDBACK_USAGE, response_type="ephemeral")
        return
    rest = args[1:]
    confirmations = "confirmations=on" in [a.lower() for a in rest]
    rest = [a for a in rest if not a.lower().startswith("confirmations=")]
    if len(rest) > 1:
        respond(text=FEEDBACK_USAGE, response_type="ephemeral")
        return
    name = check_dataset_name(rest[0]) if rest else DEFAULT_NAME
    with new_session(ctx.db) as session:
        export = export_feedback(
            session,
            ArtifactStore(ctx.settings.artifact_dir),
            IngestOptions.from_settings(ctx.settings),
            channel_id=channel,
            user_id=command["user_id"],
            name=name,
            confirmations=confirmations,
        )
        dataset = export.dataset
        kinds = ", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in export.kinds.items())
        notes = []
        if export.in_eval:
            notes.append(
                f"{export.in_eval} left out: in the eval split of the checkpoint's dataset"
            )
        if export.waiting:
            notes.append(
                f"{export.waiting} of checkpoints trained on another format wait for another export"
            )
        text = (
            f":inbox_tray: <@{command['user_id']}> exported this channel's feedback ({kinds}, "
            f"on checkpoint{'s' if len(export.checkpoint_ids) > 1 else ''} "
            f"{', '.join(map(str, export.checkpoint_ids))}) as dataset *{dataset.name}* "
            f"v{dataset.version}: {dataset.train_samples} train samples, no eval split. "
            f"`/finetune start dataset={dataset.name}` trains on it (so does `/finetune start` "
            "without a dataset: it is this channel's newest)."
            + (f" ({'; '.join(notes)}.)" if notes else "")
        )
    respond(text=text, response_type="in_channel")


def summary_text(rows: list[Feedback]) -> str:
    """The channel's feedback: per right label how often it was corrected to and confirmed, and
    how often the model was right on the answers people judged.

    >>> rows = [Feedback(kind="correction", predicted_label="财经", correct_label="体育"),
    ...         Feedback(kind="confirmation", predicted_label="体育", correct_label="体育"),
    ...         Feedback(kind="confirmation", predicted_label="娱乐", correct_label="娱乐")]
    >>> print(summary_text(rows))
    *Feedback in this channel:* 3 answers judged, 1 corrected, 2 confirmed (1 correction not exported yet). The model was right on 2 of 3 (67%) — answers people chose to judge, not a sample of the eval split.
    • *体育*: corrected to it 1 (the model said 财经 ×1), confirmed 1
    • *娱乐*: confirmed 1
    """
    if not rows:
        return (
            "No feedback in this channel yet: choose the right label under a `/classify` "
            'answer ("Wrong label?"), or 👍 a right one.'
        )
    corrections = [r for r in rows if r.kind == FeedbackKind.correction.value]
    confirmed = Counter(r.correct_label for r in rows if r.kind == FeedbackKind.confirmation.value)
    corrected = Counter(r.correct_label for r in corrections)
    pending = sum(1 for r in corrections if r.exported_at is None)
    right = len(rows) - len(corrections)
    lines = [
        f"*Feedback in this channel:* {len(rows)} answers judged, {len(corrections)} corrected, "
        f"{right} confirmed ({pending} correction{'s' if pending != 1 else ''} not exported yet). The model was right on {right} of "
        f"{len(rows)} ({pct(right / len(rows))}) — answers people chose to judge, not a sample "
        "of the eval split."
    ]
    order = sorted(set(corrected) | set(confirmed), key=lambda lb: (-corrected[lb], -confirmed[lb]))
    for label in order:
        parts = []
        if corrected[label]:
            said = Counter(r.predicted_label for r in corrections if r.correct_label == label)
            was = ", ".join(f"{escape(p)} ×{n}" for p, n in said.most_common(3))
            parts.append(f"corrected to it {corrected[label]} (the model said {was})")
        if confirmed[label]:
            parts.append(f"confirmed {confirmed[label]}")
        lines.append(f"• *{escape(label)}*: " + ", ".join(parts))
    return "\n".join(lines)
