"""Typed errors with a message a user can act on.

Domain code raises these; each surface (CLI, Slack, HTTP) turns them into its own output in exactly
one place. Anything that is not a ``FinetuneError`` is a bug: surfaces show a generic message with
an error id that is also in the logs.
"""

from __future__ import annotations

from dataclasses import dataclass


class FinetuneError(Exception):
    """Base class: ``message`` is safe to show to the user who caused it."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(FinetuneError):
    """A setting, parameter or argument is missing or out of range. ``fields`` optionally maps
    form fields to their own messages (the Slack start modal shows them per field)."""

    code = "config"

    def __init__(self, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or {}


class NotFound(FinetuneError):
    code = "not_found"


class BenchmarkRejected(FinetuneError):
    """A multiple-choice benchmark upload cannot be used (names the file, row and field)."""

    code = "benchmark_rejected"


class Forbidden(FinetuneError):
    code = "forbidden"


class Conflict(FinetuneError):
    """The request contradicts the current state (already decided, already running, …)."""

    code = "conflict"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, located as precisely as we can."""

    message: str
    file: str | None = None
    split: str | None = None
    index: int | None = None  # 0-based record index within its file
    field: str | None = None
    line: int | None = None
    column: int | None = None

    def where(self) -> str:
        parts: list[str] = []
        if self.file:
            parts.append(self.file)
        elif self.split:
            parts.append(self.split)
        if self.line is not None:
            loc = f"line {self.line}"
            if self.column is not None:
                loc += f", column {self.column}"
            parts.append(loc)
        if self.index is not None:
            parts.append(f"record {self.index}")
        if self.field:
            parts.append(f"field `{self.field}`")
        return ", ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class DatasetRejected(FinetuneError):
    """The upload cannot be used; nothing was stored. Lists every problem found."""

    code = "dataset_rejected"
    shown = 20

    def __init__(self, problems: list[Problem] | Problem) -> None:
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        lines = [str(p) for p in self.problems[: self.shown]]
        more = len(self.problems) - self.shown
        if more > 0:
            lines.append(f"… and {more} more")
        head = (
            "Dataset rejected"
            if len(self.problems) == 1
            else (f"Dataset rejected: {len(self.problems)} problems")
        )
        super().__init__(head + ":\n" + "\n".join(f"- {line}" for line in lines))
