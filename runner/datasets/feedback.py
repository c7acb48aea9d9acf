"""``/finetune feedback export``: a channel's corrections (and, if asked, confirmations) of
``/classify`` answers stored as a new version of a dataset, ready for ``/finetune start
dataset=…``.

Each record is written the way the answering checkpoint was trained: the headline framed by the
checkpoint's ``prompt_frame`` (system prompt, text around the headline) and the right label in its
``answer_style``. A checkpoint trained with reasoning gets an *empty* ``<think>`` block before the
label (``<think>\\n\\n</think>`` and the separator, what ``reasoning=off`` feeds it at serving):
a correction says which label is right, not why, and made-up reasoning, or the corrector's name
in it, is not something the model should learn to write. The price: training on these records
alone teaches the model to answer such headlines without thinking first; train on them together
with the original data (or a dataset with reasoning) to keep the habit.

The version has a train split only, and it carries the checkpoint's label set and prompt frame
(not ones inferred from a handful of corrections, which may name three labels of ten). A
headline that is in the eval split of the checkpoint's dataset is left out (and stays
unexported), so an evaluation on that split is not scored on what was trained on. Feedback of
checkpoints trained on a different format (frame, answer style, label set) than the newest one's
waits for an export of its own.

All or nothing: the dataset row and the rows' ``exported_at`` are one transaction; a failure
stores no dataset and marks nothing exported.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from core.enums import FeedbackKind
from core.errors import Conflict
from core.label_scoring import AnswerStyle
from core.protocol import THINK_CLOSE, THINK_OPEN, Message, PromptFrame
from runner.datasets.ingest import IngestOptions, ingest_dataset, read_split, serialise_split
from storage.artifacts import ArtifactStore
from storage.feedback import mark_feedback_exported, unexported_feedback
from storage.models import Checkpoint, Dataset, Feedback

DEFAULT_NAME = "feedback"
TOKENIZER_NOTE = "not measured: exported by the bot, which loads no tokenizer"


class NothingToExport(Conflict):
    code = "nothing_to_export"


@dataclass(frozen=True)
class TrainingFormat:
    """What a checkpoint's training records looked like."""

    frame: PromptFrame
    style: AnswerStyle
    labels: tuple[str, ...]

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> TrainingFormat:
        meta = checkpoint.meta or {}
        return cls(
            PromptFrame.from_dict(meta.get("prompt_frame") or {}),
            AnswerStyle.from_dict(meta.get("answer_style")),
            tuple(meta.get("labels") or ()),
        )

    def answer(self, label: str) -> str:
        """The right label as the checkpoint's training answers put it.

        >>> TrainingFormat(PromptFrame(), AnswerStyle(True, "\\n\\n"), ("体育",)).answer("体育")
        '<think>\\n\\n</think>\\n\\n体育'
        >>> TrainingFormat(PromptFrame(), AnswerStyle(False, ""), ("体育",)).answer("体育")
        '体育'
        """
        if not self.style.reasoning:
            return label
        return f"{THINK_OPEN}\n\n{THINK_CLOSE}{self.style.separator}{label}"

    def conversation(self, text: str, label: str) -> list[Message]:
        return [*self.frame.conversation(text), Message("assistant", self.answer(label))]


@dataclass
class FeedbackExport:
    dataset: Dataset
    exported: list[Feedback]
    checkpoint_ids: list[int]
    in_eval: int = 0  # left out: the headline is in the eval split of the checkpoint's dataset
    waiting: int = 0  # left for another export: a checkpoint of another training format
    kinds: dict[str, int] = field(default_factory=dict)


def export_feedback(
    session: Session,
    store: ArtifactStore,
    options: IngestOptions,
    *,
    channel_id: str,
    user_id: str,
    name: str = DEFAULT_NAME,
    confirmations: bool = False,
) -> FeedbackExport:
    """Store the channel's feedback no export has taken yet as the next version of ``name`` in
    the channel; NothingToExport when there is none (or none that may be trained on)."""
    kinds = [FeedbackKind.correction] + ([FeedbackKind.confirmation] if confirmations else [])
    rows = unexported_feedback(session, channel_id=channel_id, kinds=kinds)
    if not rows:
        what = "corrections or confirmations" if confirmations else "corrections"
        raise NothingToExport(
            f"nothing new to export: no {what} in this channel since the last export"
            + ("" if confirmations else " (`confirmations=on` takes 👍 confirmations too)")
        )
    formats = {
        cid: TrainingFormat.of(checkpoint)
        for cid in {r.checkpoint_id for r in rows}
        if (checkpoint := session.get(Checkpoint, cid)) is not None
    }
    target = formats[rows[-1].checkpoint_id]  # the newest feedback's checkpoint decides
    same = [r for r in rows if formats.get(r.checkpoint_id) == target]
    held_out = _eval_prompts(session, store, [cid for cid, f in formats.items() if f == target])
    taken = [r for r in same if _user_turn(target, r.text) not in held_out]
    if not taken:
        raise NothingToExport(
            f"nothing new to export: the {len(same)} new item(s) are all in the eval split of "
            "the checkpoint's dataset, and are kept out of training so its scores stay honest"
        )
    conversations = _unique([target.conversation(r.text, r.correct_label) for r in taken])
    try:
        with tempfile.TemporaryDirectory(prefix="feedback-") as folder:
            path = Path(folder) / f"{name}.jsonl"
            path.write_bytes(serialise_split(conversations))
            dataset, report = ingest_dataset(
                session,
                store,
                path,
                options,
                name=name,
                tokenizer=None,
                tokenizer_note=TOKENIZER_NOTE,
                channel_id=channel_id,
                uploaded_by=user_id,
                commit=False,
            )
        assert dataset.id is not None
        dataset.labels = list(target.labels) or dataset.labels
        dataset.prompt_frame = target.frame.to_dict()
        dataset.report = {
            **report,
            "labels": dataset.labels,
            "prompt_frame": dataset.prompt_frame,
            "feedback": {
                "items": len(taken),
                "checkpoints": sorted({r.checkpoint_id for r in taken}),
                "confirmations": confirmations,
                "reasoning": "empty <think> block" if target.style.reasoning else "none",
            },
        }
        session.add(dataset)
        mark_feedback_exported(
            session, feedback_ids=[r.id for r in taken if r.id is not None], dataset_id=dataset.id
        )
        session.commit()
    except IntegrityError as exc:  # the same version taken meanwhile (an upload, an export)
        session.rollback()
        raise Conflict(
            f"dataset {name} got a new version while this export was written; nothing was "
            "stored or marked exported: export again"
        ) from exc
    except BaseException:
        session.rollback()
        raise
    session.refresh(dataset)
    counts: dict[str, int] = {}
    for r in taken:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    return FeedbackExport(
        dataset=dataset,
        exported=taken,
        checkpoint_ids=sorted({r.checkpoint_id for r in taken}),
        in_eval=len(same) - len(taken),
        waiting=len(rows) - len(same),
        kinds=counts,
    )


def _user_turn(target: TrainingFormat, text: str) -> str:
    return target.frame.conversation(text)[-1].content


def _eval_prompts(session: Session, store: ArtifactStore, checkpoint_ids: Sequence[int]) -> set:
    """The last user turns of the eval splits of the datasets these checkpoints trained on."""
    prompts: set[str] = set()
    for cid in checkpoint_ids:
        checkpoint = session.get(Checkpoint, cid)
        dataset_id = (
            ((checkpoint.meta or {}).get("dataset") or {}).get("id") if checkpoint else None
        )
        dataset = session.get(Dataset, dataset_id) if dataset_id is not None else None
        if dataset is None or dataset.eval_sha256 is None:
            continue
        for conversation in read_split(store, dataset.eval_sha256):
            users = [m.content for m in conversation if m.role == "user"]
            if users:
                prompts.add(users[-1])
    return prompts


def _unique(conversations: list[list[Message]]) -> list[list[Message]]:
    """Each record once (two people giving the same headline the same label)."""
    seen: set[str] = set()
    kept = []
    for conversation in conversations:
        key = json.dumps([m.to_dict() for m in conversation], ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            kept.append(conversation)
    return kept
