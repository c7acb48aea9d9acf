"""Logging setup shared by the processes: JSON lines (one object per record, for log shippers) or
plain text, chosen by ``LOG_FORMAT`` (json | text)."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, extra fields included.

    >>> import logging
    >>> record = logging.makeLogRecord({"msg": "promoted %s", "args": (7,), "levelname": "INFO",
    ...                                 "name": "serving", "checkpoint_id": 7})
    >>> entry = json.loads(JsonFormatter().format(record))
    >>> entry["message"], entry["checkpoint_id"], entry["logger"]
    ('promoted 7', 7, 'serving')
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(default: str = "json", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    if os.environ.get("LOG_FORMAT", default) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
