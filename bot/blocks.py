"""Block Kit builders: pure functions of domain rows, called by listeners and tests alike."""

from __future__ import annotations

from typing import Any

from storage.models import Dataset, Job

STATE_EMOJI = {
    "queued": ":hourglass_flowing_sand:",
    "running": ":runner:",
    "evaluating": ":bar_chart:",
    "succeeded": ":white_check_mark:",
    "failed": ":x:",
    "cancelled": ":no_entry_sign:",
}


def progress_bar(step: int, total: int, width: int = 20) -> str:
    """>>> progress_bar(5, 20, width=10)
    '▓▓░░░░░░░░ 25%'
    """
    done = round(width * step / total) if total else 0
    return "▓" * done + "░" * (width - done) + f" {round(100 * step / total) if total else 0}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def job_header_blocks(job: Job, dataset: Dataset | None) -> list[dict[str, Any]]:
    """The job's root message: state, progress bar, step/total, loss, ETA; edited in place."""
    progress = job.progress or {}
    title = f"{STATE_EMOJI.get(job.status, '')} *Fine-tuning job {job.id}* · {job.status}"
    lines = [title]
    if dataset is not None:
        lines.append(
            f"Dataset *{dataset.name}* v{dataset.version} ({dataset.train_samples} "
            f"train, {dataset.eval_samples} eval) on `{job.base_model}`"
        )
    if progress.get("total_steps"):
        lines.append(
            f"`{progress_bar(progress['step'], progress['total_steps'])}` step "
            f"{progress['step']}/{progress['total_steps']} · loss "
            f"{progress.get('loss', float('nan')):.4f} · ETA "
            f"{_duration(progress.get('eta_s'))}"
        )
    if job.error:
        lines.append(f":warning: {job.error}")
    settings = ", ".join(f"{k}={v}" for k, v in sorted((job.config or {}).items()))
    context = f"requested by <@{job.requested_by}>" if job.requested_by else "requested"
    if settings:
        context += f" · {settings}"
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
    ]


def job_line(job: Job) -> str:
    progress = job.progress or {}
    step = (
        f" · step {progress['step']}/{progress['total_steps']}"
        if progress.get("total_steps")
        else ""
    )
    return f"{STATE_EMOJI.get(job.status, '')} job {job.id} · {job.status}{step}"


def dataset_line(dataset: Dataset) -> str:
    labels = f"{len(dataset.labels)} labels" if dataset.labels else "free-form answers"
    who = f" · by <@{dataset.uploaded_by}>" if dataset.uploaded_by else ""
    return (
        f"*{dataset.name}* v{dataset.version} · {dataset.train_samples} train / "
        f"{dataset.eval_samples} eval · {labels} · {dataset.format}{who}"
    )


def text_blocks(text: str) -> list[dict[str, Any]]:
    return [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
