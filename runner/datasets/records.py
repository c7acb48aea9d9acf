"""Decode data files into records and records into conversations.

Each parser collects every problem (file, record index, field) instead of stopping at the first,
so one rejection lists everything the uploader has to fix.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import Problem
from core.protocol import Message

Conversation = list[Message]


@dataclass
class Parsed:
    conversations: list[Conversation] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def decode_text(name: str, data: bytes) -> tuple[str | None, Problem | None]:
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        return None, Problem(f"not UTF-8 text (bad byte at offset {exc.start})", file=name)


def load_json_records(name: str, data: bytes) -> tuple[list[Any], list[Problem]]:
    """A JSON array of records, or JSON Lines (for .jsonl, or a .json holding one object a line)."""
    text, problem = decode_text(name, data)
    if text is None:
        return [], [problem] if problem else []
    if not name.lower().endswith(".jsonl"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                return [], [
                    Problem(
                        f"invalid JSON: {exc.msg}", file=name, line=exc.lineno, column=exc.colno
                    )
                ]
        else:
            if isinstance(value, list):
                return value, []
            return [], [
                Problem(f"expected a JSON array of records, found {_kind(value)}", file=name)
            ]
    records: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            return [], [
                Problem(f"invalid JSON: {exc.msg}", file=name, line=lineno, column=exc.colno)
            ]
    return records, []


def _kind(value: object) -> str:
    names: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class ChatSpec:
    """Where a chat-format record keeps its turns (LLaMA-Factory's ``columns`` and ``tags``)."""

    messages: str = "conversations"
    system: str | None = None
    role_tag: str = "from"
    content_tag: str = "value"
    user_tags: tuple[str, ...] = ("human", "user")
    assistant_tags: tuple[str, ...] = ("gpt", "assistant")
    system_tags: tuple[str, ...] = ("system",)


SHAREGPT = ChatSpec()
OPENAI = ChatSpec(messages="messages", role_tag="role", content_tag="content")


@dataclass(frozen=True)
class AlpacaSpec:
    prompt: str = "instruction"
    query: str | None = "input"
    response: str = "output"
    system: str | None = "system"
    history: str | None = "history"


ALPACA = AlpacaSpec()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def parse_chat(name: str, records: Sequence[Any], spec: ChatSpec) -> Parsed:
    out = Parsed()
    for index, record in enumerate(records):
        loc: dict[str, Any] = {"file": name, "index": index}
        if not isinstance(record, dict):
            out.problems.append(Problem(f"expected an object, found {_kind(record)}", **loc))
            continue
        turns = record.get(spec.messages)
        if not isinstance(turns, list) or not turns:
            what = "missing" if turns is None else "not a non-empty list"
            out.problems.append(Problem(f"{what}", field=spec.messages, **loc))
            continue
        conversation: Conversation = []
        if spec.system and record.get(spec.system):
            system = _text(record[spec.system])
            if system is None:
                out.problems.append(Problem("must be a string", field=spec.system, **loc))
                continue
            conversation.append(Message("system", system))
        bad = False
        for t, turn in enumerate(turns):
            path = f"{spec.messages}[{t}]"
            if not isinstance(turn, dict):
                out.problems.append(
                    Problem(f"expected an object, found {_kind(turn)}", field=path, **loc)
                )
                bad = True
                break
            role_value, content = turn.get(spec.role_tag), turn.get(spec.content_tag)
            role = _role(role_value, spec)
            if role is None:
                allowed = ", ".join(spec.user_tags + spec.assistant_tags + spec.system_tags)
                what = "missing" if role_value is None else f"unknown role {role_value!r}"
                out.problems.append(
                    Problem(f"{what} (allowed: {allowed})", field=f"{path}.{spec.role_tag}", **loc)
                )
                bad = True
                break
            if _text(content) is None:
                what = "missing" if content is None else "must be a string"
                out.problems.append(Problem(what, field=f"{path}.{spec.content_tag}", **loc))
                bad = True
                break
            conversation.append(Message(role, str(content)))
        if bad:
            continue
        problem = check_turn_order(conversation)
        if problem:
            out.problems.append(Problem(problem, field=spec.messages, **loc))
            continue
        out.conversations.append(conversation)
    return out


def _role(value: object, spec: ChatSpec) -> str | None:
    if value in spec.user_tags:
        return "user"
    if value in spec.assistant_tags:
        return "assistant"
    if value in spec.system_tags:
        return "system"
    return None


def check_turn_order(conversation: Sequence[Message]) -> str | None:
    """An optional system turn, then user and assistant alternating, ending with a non-empty
    assistant answer; ``None`` when the order is right."""
    roles = [m.role for m in conversation]
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    for i, role in enumerate(body):
        if role != expected[i]:
            got = " → ".join(roles)
            return (
                f"roles out of order at turn {i + len(roles) - len(body)}: expected "
                f"{expected[i]}, got {role} (order: {got}); expected an optional system turn, "
                "then user and assistant alternating"
            )
    if not body:
        return "no user or assistant turns"
    if body[-1] != "assistant":
        return "the last turn must be the assistant's answer"
    if not conversation[-1].content.strip():
        return "the assistant's answer is empty"
    if any(not m.content.strip() for m in conversation if m.role == "user"):
        return "a user turn is empty"
    return None


def parse_alpaca(name: str, records: Sequence[Any], spec: AlpacaSpec = ALPACA) -> Parsed:
    out = Parsed()
    for index, record in enumerate(records):
        loc: dict[str, Any] = {"file": name, "index": index}
        if not isinstance(record, dict):
            out.problems.append(Problem(f"expected an object, found {_kind(record)}", **loc))
            continue
        prompt, response = record.get(spec.prompt), record.get(spec.response)
        query = record.get(spec.query) if spec.query else None
        problems = []
        for key, value, required in (
            (spec.prompt, prompt, True),
            (spec.response, response, True),
            (spec.query, query, False),
        ):
            if value is None and not required:
                continue
            if value is None or _text(value) is None:
                problems.append(
                    Problem("missing" if value is None else "must be a string", field=key, **loc)
                )
        if problems:
            out.problems.extend(problems)
            continue
        assert isinstance(prompt, str) and isinstance(response, str)
        user = "\n".join(part for part in (prompt, query) if isinstance(part, str) and part)
        conversation: Conversation = []
        system = record.get(spec.system) if spec.system else None
        if system:
            if _text(system) is None:
                out.problems.append(Problem("must be a string", field=spec.system, **loc))
                continue
            conversation.append(Message("system", system))
        history = record.get(spec.history) if spec.history else None
        if history:
            pairs = _history_pairs(history)
            if pairs is None:
                out.problems.append(
                    Problem(
                        "must be a list of [question, answer] string pairs",
                        field=spec.history,
                        **loc,
                    )
                )
                continue
            for q, a in pairs:
                conversation += [Message("user", q), Message("assistant", a)]
        conversation += [Message("user", user), Message("assistant", response)]
        problem = check_turn_order(conversation)
        if problem:
            out.problems.append(Problem(problem, field=spec.response, **loc))
            continue
        out.conversations.append(conversation)
    return out


def _history_pairs(value: object) -> list[tuple[str, str]] | None:
    if not isinstance(value, list):
        return None
    pairs = []
    for pair in value:
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        ):
            return None
        pairs.append((pair[0], pair[1]))
    return pairs


TEXT_COLUMNS = ("text", "headline", "title", "sentence", "content", "input", "query")
LABEL_COLUMNS = ("label", "category", "class", "output", "target")


def parse_table(
    name: str, data: bytes, *, text_column: str | None = None, label_column: str | None = None
) -> Parsed:
    """CSV/TSV with a header row: one text column and one label column become a user turn and
    its answer (the prompt frame then wraps the text exactly as serving will)."""
    out = Parsed()
    text, problem = decode_text(name, data)
    if text is None:
        out.problems.append(problem)  # type: ignore[arg-type]
        return out
    delimiter = "\t" if name.lower().endswith(".tsv") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        out.problems.append(Problem("empty file: expected a header row", file=name))
        return out
    lowered = [h.lower() for h in header]
    text_at = _pick_column(lowered, text_column, TEXT_COLUMNS)
    label_at = _pick_column(lowered, label_column, LABEL_COLUMNS)
    if text_at is None or label_at is None or text_at == label_at:
        missing = "text" if text_at is None else "label"
        options = TEXT_COLUMNS if missing == "text" else LABEL_COLUMNS
        given = text_column if missing == "text" else label_column
        hint = (
            f"column {given!r} is not in the header"
            if given
            else f"none of {', '.join(options)} is in the header"
        )
        out.problems.append(
            Problem(
                f"no {missing} column: {hint} (header: {', '.join(header) or '(empty)'}); "
                f"name it with --{missing}-column",
                file=name,
                line=1,
            )
        )
        return out
    for index, row in enumerate(reader):
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        loc: dict[str, Any] = {"file": name, "index": index, "line": line}
        if len(row) != len(header):
            out.problems.append(
                Problem(f"{len(row)} fields where the header has {len(header)}", **loc)
            )
            continue
        value, label = row[text_at].strip(), row[label_at].strip()
        if not value:
            out.problems.append(Problem("empty", field=header[text_at], **loc))
            continue
        if not label:
            out.problems.append(Problem("empty", field=header[label_at], **loc))
            continue
        out.conversations.append([Message("user", value), Message("assistant", label)])
    return out


def _pick_column(lowered: list[str], wanted: str | None, candidates: Sequence[str]) -> int | None:
    if wanted:
        return lowered.index(wanted.lower()) if wanted.lower() in lowered else None
    for name in candidates:
        if name in lowered:
            return lowered.index(name)
    return None
