"""The validation report of a raw-text (``stage=pt``) dataset: documents and tokens per split,
documents over ``cutoff_len`` (and what splitting or truncating makes of them), exact duplicates,
held-out documents equal to train ones. Pure, like the SFT report beside it."""

from __future__ import annotations

from typing import Any

import numpy as np

from core.enums import Split
from core.errors import Problem
from core.protocol import ChatTokenizer
from runner.datasets.layout import Loaded
from runner.datasets.raw_text import HOLD_OUT_EVERY, document_ids
from runner.datasets.report import (
    SHOWN,
    duplicate_groups,
    length_report,
    warn_duplicates,
    warning_lines,
)


def build_text_report(
    loaded: Loaded,
    *,
    tokenizer: ChatTokenizer | None,
    cutoff_len: int,
    tokenizer_note: str | None = None,
) -> dict[str, Any]:
    warnings: list[Problem] = []
    splits: dict[str, Any] = {}
    for split, documents in loaded.documents.items():
        splits[split.value] = _split_report(split, documents, tokenizer, cutoff_len, warnings)
    train = loaded.documents.get(Split.train, [])
    held = loaded.documents.get(Split.eval, [])
    if not held:
        warnings.append(
            Problem(
                f"no held-out documents: with fewer than {HOLD_OUT_EVERY} documents and no eval "
                "file nothing is kept back, so the job cannot report perplexity"
            )
        )
    duplicates = {s.value: duplicate_groups(d, str) for s, d in loaded.documents.items()}
    warn_duplicates(duplicates, "document", warnings)
    in_train = {d: i for i, d in reversed(list(enumerate(train)))}
    leaks = [(in_train[d], i) for i, d in enumerate(held) if d in in_train]
    for train_index, eval_index in leaks[:SHOWN]:
        warnings.append(
            Problem(
                f"the same text is train document {train_index}: held-out perplexity would be "
                "flattered",
                split="eval",
                index=eval_index,
            )
        )
    return {
        "accepted": True,
        "kind": "pt",
        "format": loaded.format,
        "sources": {s.value: names for s, names in loaded.sources.items()},
        "samples": {s.value: len(d) for s, d in loaded.documents.items()},
        "held_out": loaded.held_out,
        "labels": None,
        "splits": splits,
        "duplicates": {s: len(g) for s, g in duplicates.items()},
        "leakage": len(leaks),
        "prompt_frame": {},
        "tokenizer": tokenizer_note,
        "cutoff_len": cutoff_len,
        "problems": [dict(p.to_dict(), severity="warning") for p in warnings],
    }


def _split_report(
    split: Split,
    documents: list[str],
    tokenizer: ChatTokenizer | None,
    cutoff_len: int,
    warnings: list[Problem],
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "documents": len(documents),
        "characters": sum(len(d) for d in documents),
    }
    if tokenizer is None or not documents:
        return report
    lengths = np.array([len(document_ids(tokenizer, d)) for d in documents])
    tokens = length_report(
        lengths,
        cutoff_len,
        split,
        warnings,
        lambda n: (
            f"split into {-(-n // cutoff_len)} sequences (long_docs=split, the default) "
            "or cut (long_docs=truncate)"
        ),
    )
    report["tokens"] = {
        **tokens,
        "sequences_if_split": int(sum(-(-int(n) // cutoff_len) for n in lengths)),
        "tokens_if_truncated": int(np.minimum(lengths, cutoff_len).sum()),
    }
    return report


def render_text_report(report: dict[str, Any]) -> str:
    """The raw-text report as plain text (CLI and, in a code block, Slack)."""
    lines = [f"Format: {report['format']} (raw text for stage=pt)"]
    for split, info in report["splits"].items():
        line = f"{split}: {info['documents']} documents, {info['characters']} characters"
        if split == "eval" and report.get("held_out"):
            line += f" (held out: every {HOLD_OUT_EVERY}th train document)"
        tokens = info.get("tokens")
        if tokens:
            line += (
                f"; tokens p50 {tokens['p50']}, p95 {tokens['p95']}, max {tokens['max']}, "
                f"total {tokens['total']}, {tokens['over_cutoff']} over cutoff_len "
                f"{report['cutoff_len']} ({tokens['sequences_if_split']} sequences split, "
                f"{tokens['tokens_if_truncated']} tokens truncated)"
            )
        lines.append(line)
    if report.get("tokenizer"):
        lines.append(f"Token lengths: {report['tokenizer']}")
    dup = ", ".join(f"{s} {n}" for s, n in report["duplicates"].items())
    lines.append(f"Exact duplicates: {dup}; held-out documents also in train: {report['leakage']}")
    lines += warning_lines(report["problems"])
    return "\n".join(lines)
