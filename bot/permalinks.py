"""Links between the App Home, job threads and eval reports: ``chat.getPermalink`` of a message,
cached in memory (a message's permalink never changes), and where a checkpoint's eval report was
posted (the notifier records the report's ts on its ``evaluated`` event as ``_report_ts``).

A link is a nicety: when Slack cannot give one (the message or channel is gone, Slack is down),
the row or message is shown without it, never refused."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from http.client import HTTPException
from typing import Any

from slack_sdk.errors import SlackApiError
from sqlmodel import Session, col, select

from storage.models import Job, JobEvent

log = logging.getLogger(__name__)

REPORT_TS = "_report_ts"  # on an `evaluated` event: the ts of its report message in the thread
GONE = {"message_not_found", "channel_not_found", "thread_not_found"}  # asking again won't help
MAX_CACHED = 10_000
REPORT_EVENTS_SCANNED = 500


class Permalinks:
    """``chat.getPermalink``, each message asked once: the link, or None (remembered when Slack
    says the message or channel is gone; asked again after any other failure)."""

    def __init__(self, *, max_cached: int = MAX_CACHED) -> None:
        self._cache: OrderedDict[tuple[str, str], str | None] = OrderedDict()
        self._max = max_cached
        self._lock = threading.Lock()

    def link(self, client: Any, channel: str | None, ts: str | None) -> str | None:
        if not channel or not ts:
            return None
        key = (channel, ts)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            found = client.chat_getPermalink(channel=channel, message_ts=ts).get("permalink")
        except SlackApiError as exc:
            code = str(exc.response.get("error") or exc.response.status_code)
            log.info("no permalink for %s/%s (Slack: %s)", channel, ts, code)
            if code not in GONE:
                return None
            found = None
        except (OSError, HTTPException) as exc:
            log.info("no permalink for %s/%s (%s)", channel, ts, type(exc).__name__)
            return None
        with self._lock:
            self._cache[key] = found
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return str(found) if found else None


def mrkdwn_link(url: str | None, label: str) -> str:
    """``<url|label>`` for a link Slack gave, "" for none.

    >>> mrkdwn_link("https://t.slack.com/archives/C1/p1", "thread"), mrkdwn_link(None, "thread")
    ('<https://t.slack.com/archives/C1/p1|thread>', '')
    """
    return f"<{url}|{label}>" if url else ""


def report_messages(session: Session, checkpoint_ids: list[int]) -> dict[int, tuple[str, str]]:
    """Where the newest delivered eval report of each checkpoint is: (channel, ts). A report is
    posted in the thread of the job that evaluated the checkpoint (the job that trained it, or a
    `/finetune evaluate` job); the newest ``REPORT_EVENTS_SCANNED`` reports are looked at."""
    wanted = set(checkpoint_ids)
    if not wanted:
        return {}
    rows = session.exec(
        select(JobEvent, Job)
        .join(Job, col(Job.id) == col(JobEvent.job_id))
        .where(
            col(JobEvent.kind) == "evaluated",
            col(JobEvent.delivered_at).is_not(None),
            col(Job.channel_id).is_not(None),
        )
        .order_by(col(JobEvent.id).desc())
        .limit(REPORT_EVENTS_SCANNED)
    ).all()
    found: dict[int, tuple[str, str]] = {}
    for event, job in rows:
        checkpoint, ts = event.payload.get("checkpoint_id"), event.payload.get(REPORT_TS)
        if checkpoint in wanted and checkpoint not in found and ts and job.channel_id:
            found[int(checkpoint)] = (job.channel_id, str(ts))
    return found
