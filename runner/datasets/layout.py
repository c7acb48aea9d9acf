"""Turn an upload's files into train/eval splits of conversations.

Layouts: a LLaMA-Factory dataset (``dataset_info.json`` at the root or inside one top folder, as the
reference tutorial's ``data_news_300.zip``), one data file, or several data files named for their
split (``train.json`` + ``eval.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from core.enums import Split
from core.errors import DatasetRejected, Problem
from runner.datasets.raw_text import (
    ParsedText,
    hold_out,
    is_text_records,
    parse_text_records,
    parse_txt,
    pt_entry_field,
)
from runner.datasets.records import (
    ALPACA,
    OPENAI,
    SHAREGPT,
    AlpacaSpec,
    ChatSpec,
    Conversation,
    Parsed,
    load_json_records,
    parse_alpaca,
    parse_chat,
    parse_table,
)
from runner.datasets.sources import DATA_SUFFIXES

DATASET_INFO = "dataset_info.json"
_EVAL_WORDS = ("eval", "test", "val", "dev")


@dataclass
class Loaded:
    """An upload's splits: conversations (``kind`` sft) or raw-text documents (``kind`` pt, in
    ``documents``; ``splits`` then stays empty). ``held_out``: the pt eval split was taken from
    the train documents (no eval file)."""

    format: str
    splits: dict[Split, list[Conversation]]
    sources: dict[Split, list[str]] = field(default_factory=dict)
    kind: str = "sft"
    documents: dict[Split, list[str]] = field(default_factory=dict)
    held_out: bool = False

    def add_documents(self, split: Split, name: str, parsed: ParsedText) -> list[Problem]:
        self.documents.setdefault(split, []).extend(parsed.documents)
        self.sources.setdefault(split, []).append(name)
        return parsed.problems

    def finish_raw_text(self, problems: list[Problem], sft_files: list[str]) -> None:
        """Make this a pt upload; refuse one that mixes raw text with conversations, and hold
        out documents for perplexity when no eval file came with it."""
        if sft_files:
            text_files = sorted(
                {n for names in self.sources.values() for n in names} - set(sft_files)
            )
            problems.append(
                Problem(
                    f"the upload mixes raw text ({', '.join(text_files)}) with conversation "
                    f"records ({', '.join(sorted(sft_files))}): upload a stage=pt dataset "
                    "(raw text only) and an SFT dataset separately"
                )
            )
        self.kind, self.splits = "pt", {}
        if not self.documents.get(Split.eval):
            train, held = hold_out(self.documents.get(Split.train, []))
            self.documents = {Split.train: train, **({Split.eval: held} if held else {})}
            self.held_out = bool(held)


def split_of(name: str) -> Split:
    """eval when the name says so (eval, test, val, dev), else train."""
    stem = PurePosixPath(name).name.lower()
    return Split.eval if any(word in stem for word in _EVAL_WORDS) else Split.train


def load_splits(
    files: dict[str, bytes], *, text_column: str | None = None, label_column: str | None = None
) -> Loaded:
    files = _strip_single_top_folder(files)
    if DATASET_INFO in files:
        return _load_llamafactory(files)
    data_files = sorted(n for n in files if n.lower().endswith(DATA_SUFFIXES))
    if not data_files:
        listed = ", ".join(sorted(files)) or "nothing"
        raise DatasetRejected(
            Problem(
                f"no data file found (the upload holds {listed}); expected .json, .jsonl, .csv, .tsv or .txt "
                f"files, or a {DATASET_INFO}"
            )
        )
    loaded = Loaded(format="", splits={Split.train: []})
    formats: set[str] = set()
    problems: list[Problem] = []
    sft_files: list[str] = []
    for name in data_files:
        split = split_of(name) if len(data_files) > 1 else Split.train
        text = _parse_raw_text(name, files[name])
        if text is not None:
            formats.add("text")
            problems += loaded.add_documents(split, name, text)
            continue
        sft_files.append(name)
        fmt, parsed = _parse_plain(name, files[name], text_column, label_column)
        formats.add(fmt)
        problems += parsed.problems
        if not parsed.problems and not parsed.conversations:
            problems.append(Problem("no records", file=name))
        loaded.splits.setdefault(split, []).extend(parsed.conversations)
        loaded.sources.setdefault(split, []).append(name)
    if "text" in formats:
        loaded.finish_raw_text(problems, sft_files)
    if problems:
        raise DatasetRejected(problems)
    loaded.format = "+".join(sorted(formats))
    return loaded


def _parse_raw_text(name: str, data: bytes) -> ParsedText | None:
    """The documents of a raw-text file (``.txt``, or JSON records whose only field is
    ``text``); None for any other file."""
    if name.lower().endswith(".txt"):
        return parse_txt(name, data)
    if name.lower().endswith((".csv", ".tsv")):
        return None
    records, problems = load_json_records(name, data)
    if problems or not is_text_records(records):
        return None
    return parse_text_records(name, records)


def _strip_single_top_folder(files: dict[str, bytes]) -> dict[str, bytes]:
    tops = {PurePosixPath(n).parts[0] for n in files}
    if len(tops) == 1 and all(len(PurePosixPath(n).parts) > 1 for n in files):
        top = tops.pop()
        return {n[len(top) + 1 :]: data for n, data in files.items()}
    return files


def _parse_plain(
    name: str, data: bytes, text_column: str | None, label_column: str | None
) -> tuple[str, Parsed]:
    if name.lower().endswith((".csv", ".tsv")):
        return "table", parse_table(name, data, text_column=text_column, label_column=label_column)
    records, problems = load_json_records(name, data)
    if problems:
        return "json", Parsed(problems=problems)
    if not records:
        return "json", Parsed(problems=[Problem("no records: the dataset is empty", file=name)])
    fmt = _detect(records)
    if fmt is None:
        keys = sorted(records[0]) if records and isinstance(records[0], dict) else []
        found = ", ".join(keys) if keys else "no object keys"
        return "unknown", Parsed(
            problems=[
                Problem(
                    f"unknown format: the first record has {found}; expected `conversations` (ShareGPT), "
                    "`messages` (OpenAI) or `instruction`/`output` (Alpaca) records, or a CSV/TSV with a "
                    "text and a label column",
                    file=name,
                    index=0 if records else None,
                )
            ]
        )
    if fmt == "alpaca":
        return fmt, parse_alpaca(name, records)
    return fmt, parse_chat(name, records, SHAREGPT if fmt == "sharegpt" else OPENAI)


def _detect(records: list[Any]) -> str | None:
    first = next((r for r in records if isinstance(r, dict)), None)
    if first is None:
        return None
    if "conversations" in first:
        return "sharegpt"
    if "messages" in first:
        return "openai"
    if "instruction" in first and "output" in first:
        return "alpaca"
    return None


def _load_llamafactory(files: dict[str, bytes]) -> Loaded:
    try:
        info = json.loads(files[DATASET_INFO].decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DatasetRejected(
            Problem(f"not UTF-8 text (bad byte at offset {exc.start})", file=DATASET_INFO)
        ) from exc
    except json.JSONDecodeError as exc:
        raise DatasetRejected(
            Problem(
                f"invalid JSON: {exc.msg}", file=DATASET_INFO, line=exc.lineno, column=exc.colno
            )
        ) from exc
    if not isinstance(info, dict) or not info:
        raise DatasetRejected(
            Problem("expected an object mapping dataset names to entries", file=DATASET_INFO)
        )
    loaded = Loaded(format="llamafactory", splits={Split.train: []})
    formats: set[str] = set()
    problems: list[Problem] = []
    sft_files: list[str] = []
    for key, entry in info.items():
        where = {"file": DATASET_INFO, "field": key}
        if not isinstance(entry, dict):
            problems.append(Problem("each dataset entry must be an object", **where))
            continue
        for remote in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
            if remote in entry and "file_name" not in entry:
                problems.append(
                    Problem(
                        f"`{remote}` entries are fetched from a hub, which this product does not do: "
                        "put the data file in the upload and name it in `file_name`",
                        **where,
                    )
                )
        if entry.get("ranking"):
            problems.append(Problem("ranking (preference) datasets are not supported", **where))
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            if not any(p.field == key for p in problems):
                problems.append(Problem("missing `file_name`", **where))
            continue
        members = _members(files, file_name)
        if not members:
            problems.append(
                Problem(
                    f"names `{file_name}`, which is not in the upload (it holds "
                    f"{', '.join(sorted(n for n in files if n != DATASET_INFO))})",
                    **where,
                )
            )
            continue
        split = split_of(key) if split_of(key) is Split.eval else split_of(file_name)
        text_field = pt_entry_field(entry)
        if text_field is not None:
            formats.add("text")
            for member in members:
                problems += loaded.add_documents(
                    split, member, _entry_text(member, files[member], text_field)
                )
            continue
        sft_files += members
        formatting = entry.get("formatting", "alpaca")
        try:
            parse = _entry_parser(formatting, entry)
        except ValueError as exc:
            problems.append(Problem(str(exc), **where))
            continue
        formats.add(formatting)
        for member in members:
            records, json_problems = load_json_records(member, files[member])
            parsed = Parsed(problems=json_problems) if json_problems else parse(member, records)
            if not parsed.problems and not parsed.conversations:
                parsed.problems.append(Problem("no records", file=member))
            problems += parsed.problems
            loaded.splits.setdefault(split, []).extend(parsed.conversations)
            loaded.sources.setdefault(split, []).append(member)
    if "text" in formats:
        loaded.finish_raw_text(problems, sft_files)
    if problems:
        raise DatasetRejected(problems)
    loaded.format = "llamafactory/" + "+".join(sorted(formats))
    return loaded


def _entry_text(member: str, data: bytes, text_field: str) -> ParsedText:
    """The documents of one file of a LLaMA-Factory pre-training entry."""
    if member.lower().endswith(".txt"):
        return parse_txt(member, data)
    records, problems = load_json_records(member, data)
    return (
        ParsedText(problems=problems)
        if problems
        else parse_text_records(member, records, text_field)
    )


def _members(files: dict[str, bytes], file_name: str) -> list[str]:
    name = file_name.strip("/")
    if name in files:
        return [name]
    prefix = name + "/"
    return sorted(n for n in files if n.startswith(prefix) and n.lower().endswith(DATA_SUFFIXES))


def _entry_parser(formatting: object, entry: dict[str, Any]) -> Any:
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise ValueError("`columns` and `tags` must be objects")
    if formatting == "alpaca":
        spec = AlpacaSpec(
            prompt=columns.get("prompt", ALPACA.prompt),
            query=columns.get("query", ALPACA.query),
            response=columns.get("response", ALPACA.response),
            system=columns.get("system", ALPACA.system),
            history=columns.get("history", ALPACA.history),
        )
        return lambda name, records: parse_alpaca(name, records, spec)
    if formatting in ("sharegpt", "openai"):
        base = SHAREGPT if formatting == "sharegpt" else OPENAI
        chat = ChatSpec(
            messages=columns.get("messages", base.messages),
            system=columns.get("system"),
            role_tag=tags.get("role_tag", base.role_tag),
            content_tag=tags.get("content_tag", base.content_tag),
            user_tags=_tags(tags.get("user_tag"), base.user_tags),
            assistant_tags=_tags(tags.get("assistant_tag"), base.assistant_tags),
            system_tags=_tags(tags.get("system_tag"), base.system_tags),
        )
        return lambda name, records: parse_chat(name, records, chat)
    raise ValueError(f"unknown `formatting` {formatting!r}: expected alpaca or sharegpt")


def _tags(explicit: object, default: tuple[str, ...]) -> tuple[str, ...]:
    return (explicit,) if isinstance(explicit, str) and explicit else default
