"""What a distillation says in its thread: pure functions of its event payloads and progress
(runner/distill_job.py writes them), called by the notifier (through ``milestone_text``) and the
job header, and by tests alike."""

from __future__ import annotations

from typing import Any

DISTILL_EVENTS = ("distill_started", "distilled")


def progress_line(progress: dict[str, Any]) -> str | None:
    """The header's progress: samples finished and kept.

    >>> progress_line({"done": 4, "kept": 3, "samples": 10})
    '4/10 samples done · 3 kept'
    """
    if not progress.get("samples"):
        return None
    return f"{progress.get('done', 0)}/{progress['samples']} samples done · {progress.get('kept', 0)} kept"


def _share(kept: int, asked: int) -> str:
    return f"{kept}/{asked} ({kept / asked:.0%})" if asked else "0/0"


def distill_milestone(kind: str, payload: dict[str, Any]) -> str | None:
    """The thread reply for a distillation's ``distill_started`` or ``distilled`` event.

    >>> distill_milestone("distill_started", {"source": {"name": "raw", "version": 1},
    ...     "samples": 10, "done": 4, "teacher": "http://gpu:8000/v1", "model": "current",
    ...     "tries": 2, "attempt": 1})
    ':test_tube: Distilling *raw* v1 (10 train samples) with `current` at http://gpu:8000/v1, up to 2 tries a sample; 4 already done (kept from an earlier run), resuming with the rest.'
    """
    if kind == "distill_started":
        source = payload.get("source") or {}
        done = int(payload.get("done") or 0)
        resume = (
            f"; {done} already done (kept from an earlier run), resuming with the rest"
            if done
            else ""
        )
        return (
            f":test_tube: Distilling *{source.get('name')}* v{source.get('version')} "
            f"({payload.get('samples')} train samples) with `{payload.get('model')}` at "
            f"{payload.get('teacher')}, up to {payload.get('tries')} tries a sample{resume}."
        )
    if kind == "distilled":
        return distilled_text(payload)
    return None


def distilled_text(payload: dict[str, Any]) -> str:
    """The result: the new dataset, yield per label, the rejected samples, the tokens.

    >>> print(distilled_text({"dataset": {"name": "raw-distilled", "version": 2,
    ...     "train_samples": 6, "eval_samples": 2}, "samples": 10, "kept": 6, "rejected": 4,
    ...     "tries": 2, "per_label": {"体育": {"asked": 6, "kept": 6}, "财经": {"asked": 4,
    ...     "kept": 0}}, "teacher_requests": 14, "tokens": 1234, "tokens_now": 700}))
    :white_check_mark: Dataset *raw-distilled* v2 stored: 6 of 10 samples kept (60%), 2 eval samples copied unchanged.
    • Rejected: 4 samples (the teacher's label was not the gold one in 2 tries)
    • Yield per label: 体育 6/6 (100%) · 财经 0/4 (0%)
    • Teacher: 14 requests, 1,234 tokens (700 in this run)
    Train on it with `/finetune start dataset=raw-distilled lr=…`
    """
    dataset = payload.get("dataset") or {}
    samples, kept = int(payload.get("samples") or 0), int(payload.get("kept") or 0)
    per_label = payload.get("per_label") or {}
    yields = " · ".join(
        f"{label} {_share(int(row['kept']), int(row['asked']))}" for label, row in per_label.items()
    )
    return "\n".join(
        [
            f":white_check_mark: Dataset *{dataset.get('name')}* v{dataset.get('version')} "
            f"stored: {kept} of {samples} samples kept ({kept / samples if samples else 0:.0%}), "
            f"{dataset.get('eval_samples') or 0} eval samples copied unchanged.",
            f"• Rejected: {payload.get('rejected', samples - kept)} samples (the teacher's label "
            f"was not the gold one in {payload.get('tries')} tries)",
            f"• Yield per label: {yields or '–'}",
            f"• Teacher: {int(payload.get('teacher_requests') or 0):,} requests, "
            f"{int(payload.get('tokens') or 0):,} tokens "
            f"({int(payload.get('tokens_now') or 0):,} in this run)",
            f"Train on it with `/finetune start dataset={dataset.get('name')} lr=…`",
        ]
    )
