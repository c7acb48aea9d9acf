"""Raw-text datasets for continued pre-training (``stage=pt``): documents, not conversations.

Layouts: a ``.txt`` file (one document per blank-line-separated block; a file without any blank
line holds one document per line), ``.json``/``.jsonl`` records whose only field is ``text``, and a
LLaMA-Factory ``dataset_info.json`` entry with ``columns: {"prompt": "text"}`` and no response
column (LLaMA-Factory's own pre-training layout). Every problem names the file, the record and
the field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import Problem
from runner.datasets.records import decode_text

TEXT_FIELD = "text"
HOLD_OUT_EVERY = 10  # without an eval file, every 10th document is held out for perplexity
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


@dataclass
class ParsedText:
    documents: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def parse_txt(name: str, data: bytes) -> ParsedText:
    """Documents of a text file: blank-line blocks, or lines when the file has no blank line.

    >>> parse_txt("a.txt", b"one\\ntwo\\n").documents
    ['one', 'two']
    >>> parse_txt("a.txt", b"first line\\nstill first\\n\\nsecond\\n").documents
    ['first line\\nstill first', 'second']
    """
    out = ParsedText()
    text, problem = decode_text(name, data)
    if text is None:
        out.problems.append(problem)  # type: ignore[arg-type]
        return out
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    parts = _BLANK_LINE.split(text) if _BLANK_LINE.search(text) else text.split("\n")
    out.documents = [part.strip() for part in parts if part.strip()]
    if not out.documents:
        out.problems.append(Problem("no documents: the file holds only whitespace", file=name))
    return out


def is_text_records(records: Sequence[Any]) -> bool:
    """Records of raw text: the first object's only field is ``text``."""
    first = next((r for r in records if isinstance(r, dict)), None)
    return first is not None and set(first) == {TEXT_FIELD}


def parse_text_records(
    name: str, records: Sequence[Any], text_field: str = TEXT_FIELD
) -> ParsedText:
    """One document per record's ``text_field``; a missing, non-string or empty one is a problem
    naming the record and the field."""
    out = ParsedText()
    for index, record in enumerate(records):
        loc: dict[str, Any] = {"file": name, "index": index, "field": text_field}
        if not isinstance(record, dict):
            out.problems.append(
                Problem(f"expected an object with a `{text_field}` field", file=name, index=index)
            )
            continue
        value = record.get(text_field)
        if value is None:
            others = ", ".join(sorted(record)) or "no fields"
            out.problems.append(Problem(f"missing (the record has {others})", **loc))
        elif not isinstance(value, str):
            out.problems.append(Problem(f"must be a string, found {type(value).__name__}", **loc))
        elif not value.strip():
            out.problems.append(Problem("empty document", **loc))
        else:
            out.documents.append(value.strip())
    if not out.problems and not out.documents:
        out.problems.append(Problem("no records", file=name))
    return out


def pt_entry_field(entry: dict[str, Any]) -> str | None:
    """The text column of a LLaMA-Factory pre-training entry (``columns: {"prompt": "text"}``,
    no response or conversation column), else None."""
    columns = entry.get("columns")
    if entry.get("formatting", "alpaca") != "alpaca" or not isinstance(columns, dict):
        return None
    if set(columns) != {"prompt"} or not isinstance(columns["prompt"], str):
        return None
    return columns["prompt"]


def hold_out(documents: list[str]) -> tuple[list[str], list[str]]:
    """(train, held out): every ``HOLD_OUT_EVERY``-th document held out for perplexity, none
    when there are fewer than ``HOLD_OUT_EVERY``.

    >>> hold_out([str(i) for i in range(10)])
    (['0', '1', '2', '3', '4', '5', '6', '7', '8'], ['9'])
    """
    if len(documents) < HOLD_OUT_EVERY:
        return documents, []
    train = [d for i, d in enumerate(documents) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    held = [d for i, d in enumerate(documents) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    return train, held


def document_chunks(ids: list[int], cutoff_len: int, long_docs: str) -> list[list[int]]:
    """A tokenised document as training sequences of at most ``cutoff_len`` tokens: split into
    consecutive chunks (``split``) or cut (``truncate``).

    >>> document_chunks([1, 2, 3, 4, 5], 2, "split"), document_chunks([1, 2, 3, 4, 5], 2, "truncate")
    ([[1, 2], [3, 4], [5]], [[1, 2]])
    """
    if long_docs == "truncate":
        return [ids[:cutoff_len]]
    return [ids[i : i + cutoff_len] for i in range(0, len(ids), cutoff_len)] or [[]]


def document_ids(tokenizer: Any, document: str) -> list[int]:
    """A document's training tokens: its text, then the end-of-sequence token (the boundary the
    model learns between documents)."""
    ids = list(tokenizer(document, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
