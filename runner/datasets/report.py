"""The validation report: what the uploader (and the approver later) needs to know about the data
before training on it. Pure: takes conversations and an optional tokenizer, returns a dict."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np

from core.enums import Split
from core.errors import Problem
from core.protocol import (
    THINK_OPEN,
    ChatTokenizer,
    Message,
    PromptFrame,
    answer_of,
    parse_answer,
    render_training_example,
)
from runner.datasets.layout import Loaded

MAX_LABELS = 100  # more distinct answers than this is free-form generation, not classification
SHOWN = 10  # indices listed per finding
T = TypeVar("T")


def label_set(conversations: Sequence[Sequence[Message]]) -> list[str] | None:
    """Labels by frequency (then name), or None when the answers are free-form text."""
    counts = label_set_counts(conversations)
    distinct = len(counts)
    if (
        distinct == 0
        or distinct > MAX_LABELS
        or (len(conversations) >= 10 and distinct > len(conversations) / 2)
    ):
        return None
    return [label for label, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def label_set_counts(conversations: Sequence[Sequence[Message]]) -> Counter[str]:
    """How often each parsed label occurs (answers without a label are not counted)."""
    return Counter(
        label for c in conversations if (label := parse_answer(answer_of(c)).label) is not None
    )


def build_report(
    loaded: Loaded,
    *,
    tokenizer: ChatTokenizer | None,
    cutoff_len: int,
    tokenizer_note: str | None = None,
) -> dict[str, Any]:
    if loaded.kind == "pt":
        from runner.datasets.text_report import build_text_report

        return build_text_report(
            loaded, tokenizer=tokenizer, cutoff_len=cutoff_len, tokenizer_note=tokenizer_note
        )
    train = loaded.splits.get(Split.train, [])
    evals = loaded.splits.get(Split.eval, [])
    labels = label_set(train + evals)
    warnings: list[Problem] = []
    splits: dict[str, Any] = {}
    for split, conversations in loaded.splits.items():
        splits[split.value] = _split_report(
            split, conversations, labels, tokenizer, cutoff_len, warnings
        )
    if not evals:
        warnings.append(
            Problem(
                "no eval split: upload an eval file too (train.json + eval.json, "
                "or a dataset_info.json naming both) so the model can be scored"
            )
        )
    duplicates = {s.value: duplicate_groups(c, _key) for s, c in loaded.splits.items()}
    warn_duplicates(duplicates, "record", warnings)
    leaks = _leakage(train, evals)
    for train_index, eval_index in leaks[:SHOWN]:
        warnings.append(
            Problem(
                f"the same prompt is train record {train_index}: eval scores would be inflated",
                split="eval",
                index=eval_index,
            )
        )
    missing: list[str] = []
    if labels is not None and evals:
        train_labels = set(label_set_counts(train))
        missing = sorted(set(label_set_counts(evals)) - train_labels)
        if missing:
            warnings.append(
                Problem(f"eval labels never seen in train: {', '.join(missing)}", split="eval")
            )
    frame = PromptFrame.infer(train)
    return {
        "accepted": True,
        "format": loaded.format,
        "sources": {s.value: names for s, names in loaded.sources.items()},
        "samples": {s.value: len(c) for s, c in loaded.splits.items()},
        "labels": labels,
        "splits": splits,
        "duplicates": {s: len(g) for s, g in duplicates.items()},
        "leakage": len(leaks),
        "eval_labels_missing_from_train": missing,
        "prompt_frame": frame.to_dict(),
        "tokenizer": tokenizer_note,
        "cutoff_len": cutoff_len,
        "problems": [dict(p.to_dict(), severity="warning") for p in warnings],
    }


def _split_report(
    split: Split,
    conversations: list[list[Message]],
    labels: list[str] | None,
    tokenizer: ChatTokenizer | None,
    cutoff_len: int,
    warnings: list[Problem],
) -> dict[str, Any]:
    parsed = [parse_answer(answer_of(c)) for c in conversations]
    with_think = sum(THINK_OPEN in answer_of(c) for c in conversations)
    for index, answer in enumerate(parsed):
        if answer.truncated:
            warnings.append(
                Problem(
                    "the answer opens <think> but never closes it: no label",
                    split=split.value,
                    index=index,
                )
            )
    report: dict[str, Any] = {"samples": len(conversations), "with_think": with_think}
    if labels is not None:
        counts = Counter(a.label for a in parsed if a.label is not None)
        report["label_counts"] = {
            label: counts.get(label, 0) for label in labels if counts.get(label, 0)
        }
    if tokenizer is not None and conversations:
        lengths = np.array(
            [len(render_training_example(tokenizer, c).input_ids) for c in conversations]
        )
        report["tokens"] = length_report(
            lengths, cutoff_len, split, warnings, lambda n: "the end of the answer would be cut"
        )
    return report


def length_report(
    lengths: np.ndarray,
    cutoff_len: int,
    split: Split,
    warnings: list[Problem],
    over_note: Callable[[int], str],
) -> dict[str, int]:
    """Token-length percentiles of a split's sequences; a warning (``over_note`` of its length
    says what training makes of it) for the first ``SHOWN`` over ``cutoff_len``."""
    over = np.flatnonzero(lengths > cutoff_len)
    for index in over[:SHOWN]:
        n = int(lengths[index])
        warnings.append(
            Problem(
                f"{n} tokens, over cutoff_len {cutoff_len}: {over_note(n)}",
                split=split.value,
                index=int(index),
            )
        )
    return {
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "total": int(lengths.sum()),
        "over_cutoff": len(over),
    }


def _key(conversation: Sequence[Message]) -> tuple[tuple[str, str], ...]:
    return tuple((m.role, m.content) for m in conversation)


def duplicate_groups(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[int]]:
    """Indices of the items that share a key, one group per key held more than once."""
    seen: dict[Hashable, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        seen[key(item)].append(index)
    return [group for group in seen.values() if len(group) > 1]


def warn_duplicates(
    duplicates: dict[str, list[list[int]]], noun: str, warnings: list[Problem]
) -> None:
    """A warning per repeat (the first ``SHOWN`` groups of each split) naming the first copy."""
    for split_name, groups in duplicates.items():
        for group in groups[:SHOWN]:
            warnings.append(
                Problem(f"exact duplicate of {noun} {group[0]}", split=split_name, index=group[1])
            )


def _leakage(
    train: Sequence[Sequence[Message]], evals: Sequence[Sequence[Message]]
) -> list[tuple[int, int]]:
    """(train index, eval index) pairs whose prompts (everything before the answer) are equal."""
    prompts: dict[tuple[tuple[str, str], ...], int] = {}
    for index, conversation in enumerate(train):
        prompts.setdefault(_key(conversation[:-1]), index)
    return [(prompts[_key(c[:-1])], i) for i, c in enumerate(evals) if _key(c[:-1]) in prompts]


def render_report(report: dict[str, Any]) -> str:
    """The report as plain text (CLI and, wrapped in a code block, Slack)."""
    if report.get("kind") == "pt":
        from runner.datasets.text_report import render_text_report

        return render_text_report(report)
    lines = [f"Format: {report['format']}"]
    for split, info in report["splits"].items():
        line = f"{split}: {info['samples']} samples, {info['with_think']} with <think>"
        tokens = info.get("tokens")
        if tokens:
            line += (
                f"; tokens p50 {tokens['p50']}, p95 {tokens['p95']}, max {tokens['max']}, "
                f"{tokens['over_cutoff']} over cutoff_len {report['cutoff_len']}"
            )
        lines.append(line)
    if report.get("tokenizer"):
        lines.append(f"Token lengths: {report['tokenizer']}")
    labels = report["labels"]
    if labels is None:
        lines.append("Labels: free-form answers (not a classification dataset)")
    else:
        lines.append(f"Labels ({len(labels)}):")
        for split, info in report["splits"].items():
            counts = info.get("label_counts", {})
            lines.append(f"  {split}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    frame = report["prompt_frame"]
    if frame.get("prefix") or frame.get("suffix") or frame.get("system"):
        lines.append(
            f"Prompt frame: {frame.get('prefix', '')!r} + text + "
            f"{frame.get('suffix', '')!r}"
            + (f", system {frame['system']!r}" if frame.get("system") else "")
        )
    dup = ", ".join(f"{s} {n}" for s, n in report["duplicates"].items())
    lines.append(f"Exact duplicates: {dup}; train/eval leakage: {report['leakage']}")
    if report["eval_labels_missing_from_train"]:
        lines.append(
            "Eval labels missing from train: " + ", ".join(report["eval_labels_missing_from_train"])
        )
    lines += warning_lines(report["problems"])
    return "\n".join(lines)


def warning_lines(problems: list[dict[str, Any]]) -> list[str]:
    """The report's warnings, one line each, under a count."""
    lines = [f"Warnings: {len(problems)}" if problems else "Warnings: none"]
    for problem in problems:
        lines.append(f"  - {Problem(**{k: v for k, v in problem.items() if k != 'severity'})}")
    return lines
