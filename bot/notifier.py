"""Relay the job-event outbox to Slack.

Per job, in event order: milestones become thread replies (the loss curve and the confusion
matrix uploaded with them, the eval report with its buttons), progress events are coalesced into one
``chat.update`` of the root message's header. Writes to a channel are paced (one a second by
default, Slack's limit). A 429 pauses that channel for ``Retry-After`` seconds; connection errors
and 5xx leave the event for the next round. An event, and each part of it, is marked delivered only
after Slack accepted it, so a retry never posts the same thing twice and a restart loses nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from slack_sdk.errors import SlackApiError
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from bot.blocks import eval_report_blocks, job_header_blocks, milestone_text
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.models import Dataset, Job, JobEvent
from storage.types import utcnow

log = logging.getLogger(__name__)

HEADER_ONLY = {"queued", "claimed", "progress", "checkpoint", "evaluating", "succeeded"}


class Paused(Exception):
    """Slack asked us to wait (429) or is unreachable: try this channel again later."""


class Notifier:
    def __init__(
        self,
        db: Engine,
        client: Any,
        store: ArtifactStore,
        *,
        channel_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.client = client
        self.store = store
        self.channel_interval = channel_interval
        self.clock = clock
        self._last_write: dict[str, float] = {}
        self._paused_until: dict[str, float] = {}

    # Slack writes, paced per channel -----------------------------------------------------------

    def _write(self, channel: str, call: Callable[[], Any]) -> Any:
        wait = self._last_write.get(channel, -math.inf) + self.channel_interval - self.clock()
        if wait > 0:
            time.sleep(wait)
        try:
            return call()
        except SlackApiError as exc:
            if exc.response.status_code == 429:
                retry = float(exc.response.headers.get("Retry-After", "1"))
                self._paused_until[channel] = self.clock() + retry
                raise Paused(f"rate limited for {retry} s") from exc
            if exc.response.status_code >= 500:
                raise Paused(f"Slack answered {exc.response.status_code}") from exc
            raise
        except OSError as exc:  # connection refused, reset, timeout
            raise Paused(str(exc)) from exc
        finally:
            self._last_write[channel] = self.clock()

    # The round ------------------------------------------------------------------------------

    def deliver_pending(self, limit: int = 500) -> int:
        """One round over undelivered events; returns how many were delivered."""
        with new_session(self.db) as session:
            events = session.exec(
                select(JobEvent)
                .where(col(JobEvent.delivered_at).is_(None))
                .order_by(col(JobEvent.id))
                .limit(limit)
            ).all()
            by_job: dict[int, list[JobEvent]] = {}
            for event in events:
                by_job.setdefault(event.job_id, []).append(event)
            delivered = 0
            for job_id, job_events in by_job.items():
                job = session.get(Job, job_id)
                if job is None or not job.channel_id or not job.thread_ts:
                    delivered += self._mark(session, job_events)  # nothing in Slack to update
                    continue
                if self._paused_until.get(job.channel_id, -math.inf) > self.clock():
                    continue
                try:
                    delivered += self._deliver_job(session, job, job_events)
                except Paused as exc:
                    log.warning("channel %s: %s; job %d events wait", job.channel_id, exc, job_id)
            return delivered

    def _mark(self, session: Session, events: list[JobEvent]) -> int:
        now = utcnow()
        for event in events:
            event.delivered_at = now
            session.add(event)
        session.commit()
        return len(events)

    def _deliver_job(self, session: Session, job: Job, events: list[JobEvent]) -> int:
        assert job.channel_id is not None and job.thread_ts is not None
        channel, thread = job.channel_id, job.thread_ts
        delivered = 0
        coalesced: list[JobEvent] = []
        for event in events:
            if event.kind == "progress":
                epoch = self._epoch_crossed(session, event)
                if epoch is not None:
                    text = milestone_text("epoch", {**event.payload, "epoch": epoch})

                    def post_epoch(text: str | None = text) -> Any:
                        return self._write(
                            channel,
                            lambda: self.client.chat_postMessage(
                                channel=channel, thread_ts=thread, text=text
                            ),
                        )

                    self._part(session, event, "epoch", post_epoch)
                coalesced.append(event)
                continue
            if event.kind in HEADER_ONLY:
                coalesced.append(event)
                continue
            self._deliver_milestone(session, event, channel, thread)
            delivered += self._mark(session, [event])
        session.refresh(job)
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        self._write(
            channel,
            lambda: self.client.chat_update(
                channel=channel,
                ts=thread,
                text=f"Fine-tuning job {job.id}: {job.status}",
                blocks=job_header_blocks(job, dataset),
            ),
        )
        return delivered + self._mark(session, coalesced)

    def _deliver_milestone(
        self, session: Session, event: JobEvent, channel: str, thread: str
    ) -> None:
        payload = event.payload
        if event.kind == "trained" and payload.get("loss_curve_sha256"):
            self._part(
                session,
                event,
                "loss_curve",
                lambda: self._upload(
                    channel,
                    thread,
                    self.store.read_bytes(payload["loss_curve_sha256"]),
                    "loss.png",
                    "Training loss",
                    milestone_text("trained", payload),
                ),
            )
            return
        if event.kind == "evaluated":
            confusion = self.store.path(payload["report_path"]) / "confusion.png"
            if confusion.exists():
                self._part(
                    session,
                    event,
                    "confusion",
                    lambda: self._upload(
                        channel,
                        thread,
                        confusion.read_bytes(),
                        "confusion.png",
                        "Confusion matrix (rows: reference, columns: predicted)",
                        None,
                    ),
                )
            self._part(
                session,
                event,
                "report",
                lambda: self._write(
                    channel,
                    lambda: self.client.chat_postMessage(
                        channel=channel,
                        thread_ts=thread,
                        blocks=eval_report_blocks(payload),
                        text=f"Evaluation of checkpoint {payload['checkpoint_id']}",
                    ),
                ),
            )
            return
        text = milestone_text(event.kind, payload)
        if text:
            self._part(
                session,
                event,
                "reply",
                lambda: self._write(
                    channel,
                    lambda: self.client.chat_postMessage(
                        channel=channel, thread_ts=thread, text=text
                    ),
                ),
            )

    def _part(self, session: Session, event: JobEvent, name: str, send: Callable[[], Any]) -> None:
        """Send one part of an event unless an earlier round already did, then remember it."""
        done = list(event.payload.get("_delivered_parts", []))
        if name in done:
            return
        send()
        event.payload = {**event.payload, "_delivered_parts": [*done, name]}
        session.add(event)
        session.commit()

    def _upload(
        self,
        channel: str,
        thread: str,
        content: bytes,
        filename: str,
        title: str,
        comment: str | None,
    ) -> Any:
        return self._write(
            channel,
            lambda: self.client.files_upload_v2(
                channel=channel,
                thread_ts=thread,
                content=content,
                filename=filename,
                title=title,
                initial_comment=comment,
            ),
        )

    def _epoch_crossed(self, session: Session, event: JobEvent) -> int | None:
        """The epoch number a progress event completed, if it crossed an epoch boundary."""
        epoch = float(event.payload.get("epoch") or 0)
        before = session.exec(
            select(JobEvent)
            .where(
                JobEvent.job_id == event.job_id,
                JobEvent.kind == "progress",
                col(JobEvent.id) < event.id,
            )
            .order_by(col(JobEvent.id).desc())
        ).first()
        previous = float(before.payload.get("epoch") or 0) if before is not None else 0.0
        return int(epoch) if int(epoch) > int(previous) else None

    # Background loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        while not stop.is_set():
            try:
                self.deliver_pending()
            except Exception:
                log.exception("notifier round failed; retrying")
            stop.wait(interval)
