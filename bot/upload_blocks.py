"""What a dataset check says in its thread: pure functions of the check's event payloads
(runner/ingest_job.py writes them), called by the notifier and by tests alike."""

from __future__ import annotations

from typing import Any


def stored_text(payload: dict[str, Any]) -> str:
    """The check's news: the dataset stored, and how to train on it.

    >>> stored_text({"filename": "news.zip", "dataset": {"name": "news", "version": 2,
    ...     "train_samples": 300, "eval_samples": 100, "labels": 10}})
    ':inbox_tray: Dataset *news* v2 stored from `news.zip`: 300 train, 100 eval, 10 labels. Train on it with `/finetune start dataset=news lr=…`'
    >>> stored_text({"filename": "c.zip", "dataset": {"name": "c", "version": 1, "kind": "pt",
    ...     "train_samples": 90, "eval_samples": 10, "labels": None}})
    ':inbox_tray: Dataset *c* v1 stored from `c.zip`: 90 train, 10 eval, raw-text documents for continued pre-training. Train on it with `/finetune start stage=pt dataset=c lr=…`'
    """
    dataset = payload["dataset"]
    labels = f"{dataset['labels']} labels" if dataset.get("labels") else "free-form answers"
    stage = ""
    if dataset.get("kind") == "pt":
        labels, stage = "raw-text documents for continued pre-training", "stage=pt "
    then = payload.get("then_job_id")
    follow = (
        f"Fine-tuning job {then} is queued on it (its own thread follows)."
        if then
        else f"Train on it with `/finetune start {stage}dataset={dataset['name']} lr=…`"
    )
    return (
        f":inbox_tray: Dataset *{dataset['name']}* v{dataset['version']} stored from "
        f"`{payload.get('filename')}`: {dataset['train_samples']} train, "
        f"{dataset['eval_samples']} eval, {labels}. {follow}"
    )


def report_text(payload: dict[str, Any]) -> str:
    return "Validation report:\n```\n" + str(payload.get("report_text") or "") + "\n```"


def rejected_text(payload: dict[str, Any]) -> str:
    """A rejected upload: every problem, located; nothing was stored.

    >>> rejected_text({"filename": "x.json", "error": "Dataset rejected:\\n- line 3: not JSON"})
    ':x: `x.json` was rejected; nothing was stored.\\nDataset rejected:\\n- line 3: not JSON'
    """
    return (
        f":x: `{payload.get('filename')}` was rejected; nothing was stored.\n"
        f"{payload.get('error', '')}"
    )
