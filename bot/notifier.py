"""Relay the job-event outbox to Slack threads.

Per job, in event order: milestones become thread replies (the loss curve, the confusion matrix
and the reliability diagram uploaded with them, the eval report with its buttons), progress events
are coalesced into one ``chat.update`` of the root message's header.

Delivery is **at least once**. An event, and each part of it (``_delivered_parts`` in its
payload), is marked delivered only after Slack accepted it, so nothing is lost; but a crash or a
lost answer between Slack's acceptance and our commit posts that part again (a reset connection
is retried by slack_sdk's ``ConnectionErrorRetryHandler`` and then by the next round, and Slack
may have posted the first try).

What Slack's answers do (``bot.slack_errors.slack_problem`` sorts them):

- ``RetryLater``: 429 (that channel pauses for Retry-After; others go on), 5xx and Slack's
  transient codes, network errors. The event waits; a network error or a 5xx holds that job for
  the round.
- ``RootGone``: ``message_not_found`` / ``thread_not_found``: the job's root message was
  deleted. A fresh root is posted, the job's ``thread_ts`` moves to it (a ``thread_moved`` event
  records it) and delivery goes on there.
- ``ThreadUnwritable``: the channel cannot be written (archived, deleted, the bot removed): the
  job's thread is given up (``jobs.thread_error``), its events are settled with
  ``job_events.delivery_error``, later ones too, without calling Slack.
- ``TokenRefused``: the bot's token is refused (``invalid_auth``, ``token_revoked``, …): every
  channel would fail alike, so the whole relay pauses and nothing is given up.
- ``Rejected``: anything else concerns that one write (``invalid_blocks``, ``msg_too_long``, a
  missing plot): a plain-text fallback where that keeps people informed, else that part is given
  up; ``delivery_error`` records it. Nothing is retried forever.

A bug (any other exception) is logged with an error id and, after ``MAX_BUG_ROUNDS`` rounds, the
event is given up with that id. A database outage ends the round; the next one retries.

No job stalls another: a round takes each job's oldest events (a bounded number of jobs and of
events per job, paused channels left out), serves channels in parallel workers, each paced to one
write per ``channel_interval`` and at most ``writes_per_round`` writes, and a failure stops only
the job it concerns. One process relays at a time (``storage.outbox.relay_lock``); another
notifier stands by until that one exits.

After each round, the App Homes that show jobs whose state changed (their requesters', and those
opened since the process started that show them: approvers', anyone's for a deployment job) are
published again (``bot.home.HomeRefresher``: at most once per ``HOME_REFRESH_SECONDS`` per user,
a 429 pausing them all for Retry-After).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from http.client import HTTPException
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlmodel import Session, col, select

from bot.blocks import (
    eval_report_blocks,
    eval_report_text,
    job_header_blocks,
    job_header_text,
    job_noun,
    milestone_text,
)
from bot.home import HOME_EVENTS, HomeRefresher
from bot.permalinks import REPORT_TS, Permalinks, mrkdwn_link, report_messages
from bot.slack_errors import (
    Rejected,
    RetryLater,
    RootGone,
    RoundSpent,
    ThreadUnwritable,
    TokenRefused,
    slack_problem,
)
from bot.upload_blocks import rejected_text, report_text, stored_text
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import set_job_thread
from storage.models import Dataset, Job, JobEvent
from storage.outbox import (
    RelayLock,
    give_up_thread,
    jobs_with_pending_events,
    mark_delivered,
    move_thread,
    pending_events,
    previous_progress,
    relay_lock,
    thread_moves,
)

log = logging.getLogger(__name__)

HEADER_ONLY = {
    "queued",
    "claimed",
    "progress",
    "distill_progress",
    "checkpoint",
    "evaluating",
    "succeeded",
}
DB_OUTAGE = (OperationalError, InterfaceError, PoolTimeout)
MAX_BUG_ROUNDS = 3
MAX_FRESH_ROOTS = 3  # root messages posted anew for one job before its thread is given up
TOKEN_PAUSE_S = 60.0
FALLBACK_CHARS = 3_000  # a plain-text fallback's length (a section's limit, readable)


def relay_client(token: str, base_url: str) -> WebClient:
    """The notifier's own client: a reset connection is retried once at once; a 429 is not
    slept on here (that would stall every channel) but pauses its channel."""
    return WebClient(token=token, base_url=base_url, retry_handlers=[ConnectionErrorRetryHandler()])


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# One round's state ------------------------------------------------------------------------------


@dataclass
class _Channel:
    """A channel's share of a round: its worker's session and the writes it made."""

    id: str
    session: Session
    writes: int = 0


@dataclass
class _JobRun:
    """One job's delivery in a round; ``current`` are the events a failure is blamed on."""

    channel: _Channel
    job: Job
    current: list[JobEvent] = field(default_factory=list)
    settled: int = 0

    @property
    def session(self) -> Session:
        return self.channel.session

    @property
    def thread(self) -> str:
        assert self.job.thread_ts is not None
        return self.job.thread_ts


class Notifier:
    def __init__(
        self,
        db: Engine,
        client: Any,
        store: ArtifactStore,
        *,
        channel_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        lock: RelayLock | None = None,
        jobs_per_round: int = 200,
        events_per_job: int = 100,
        writes_per_round: int = 10,
        workers: int = 8,
        homes: HomeRefresher | None = None,
        permalinks: Permalinks | None = None,
    ) -> None:
        self.db = db
        self.client = client
        self.store = store
        self.channel_interval = channel_interval
        self.clock = clock
        self.lock = lock if lock is not None else relay_lock(db)
        self.jobs_per_round = jobs_per_round
        self.events_per_job = events_per_job
        self.writes_per_round = writes_per_round
        self.workers = workers
        self.homes = homes
        self.permalinks = permalinks if permalinks is not None else Permalinks()
        self._last_write: dict[str, float] = {}
        self._paused_until: dict[str, float] = {}
        self._token_paused_until = -math.inf
        self._bug_rounds: dict[int, int] = {}
        self._relaying: bool | None = None

    # The round ------------------------------------------------------------------------------

    def deliver_pending(self) -> int:
        """One round over undelivered events, then the App Homes that are due (``homes``);
        returns how many events were settled."""
        if not self._hold_relay() or self._token_paused_until > self.clock():
            return 0
        settled = self._deliver_round()
        if self.homes is not None:
            self.homes.flush()
        return settled

    def _deliver_round(self) -> int:
        now = self.clock()
        paused = [channel for channel, until in self._paused_until.items() if until > now]
        with new_session(self.db) as session:
            jobs = jobs_with_pending_events(
                session, limit=self.jobs_per_round, skip_channels=paused
            )
        by_channel: dict[str, list[int]] = {}
        for job_id, channel in jobs:
            by_channel.setdefault(channel or "", []).append(job_id)
        if len(by_channel) <= 1:
            return sum(self._deliver_channel(c, ids) for c, ids in by_channel.items())
        with ThreadPoolExecutor(
            max_workers=min(self.workers, len(by_channel)), thread_name_prefix="notifier"
        ) as pool:
            rounds = [pool.submit(self._deliver_channel, c, ids) for c, ids in by_channel.items()]
        return sum(done.result() for done in rounds)  # re-raises a database outage

    def _hold_relay(self) -> bool:
        held = self.lock.acquire()
        if held != self._relaying:
            if held:
                log.info("this bot process relays the outbox (%s)", self.lock.describe())
            else:
                log.warning(
                    "another bot process relays the outbox (it holds the %s); this one stands by",
                    self.lock.describe(),
                )
            self._relaying = held
        return held

    def _deliver_channel(self, channel_id: str, job_ids: list[int]) -> int:
        settled = 0
        with new_session(self.db) as session:
            channel = _Channel(channel_id, session)
            for job_id in job_ids:
                if self._paused_until.get(channel_id, -math.inf) > self.clock():
                    break
                try:
                    settled += self._deliver_job(channel, job_id)
                except RoundSpent:
                    break
                except RetryLater as exc:
                    log.warning("job %d: %s; its messages wait for the next round", job_id, exc)
                except TokenRefused as exc:
                    self._token_paused_until = self.clock() + TOKEN_PAUSE_S
                    log.error(
                        "Slack refuses the bot token (%s): the outbox waits, nothing is given "
                        "up; fix SLACK_BOT_TOKEN (retrying in %.0f s)",
                        exc.reason,
                        TOKEN_PAUSE_S,
                    )
                    break
        return settled

    def _deliver_job(self, channel: _Channel, job_id: int) -> int:
        session = channel.session
        job = session.get(Job, job_id, populate_existing=True)
        events = pending_events(session, job_id=job_id, limit=self.events_per_job)
        if job is None or not events:
            return 0
        changed = any(event.kind in HOME_EVENTS for event in events)
        if self.homes is not None and changed:
            self.homes.job_changed(job)  # paced: see HomeRefresher
        if not job.channel_id or not job.thread_ts:
            return mark_delivered(session, events)  # a job started outside Slack: no thread
        if job.thread_error:
            return mark_delivered(session, events, error=f"thread given up: {job.thread_error}")
        run = _JobRun(channel, job, current=list(events))
        try:
            self._deliver_into_thread(run, events)
        except (RetryLater, TokenRefused, *DB_OUTAGE):
            raise
        except Exception as exc:  # a bug, or an answer we did not foresee here
            session.rollback()
            self._bug(run, exc)
        return run.settled

    def _deliver_into_thread(self, run: _JobRun, events: list[JobEvent]) -> None:
        try:
            try:
                self._deliver_events(run, events)
            except RootGone as gone:
                moves = thread_moves(run.session, job_id=run.job.id or 0)
                if moves >= MAX_FRESH_ROOTS:
                    raise ThreadUnwritable(
                        f"{gone.reason}: its root message was deleted {moves + 1} times"
                    ) from gone
                self._post_fresh_root(run, gone.reason)
                events = pending_events(
                    run.session, job_id=run.job.id or 0, limit=self.events_per_job
                )
                try:
                    self._deliver_events(run, events)
                except RootGone as again:
                    raise RetryLater(f"the fresh root is gone too ({again.reason})") from again
        except ThreadUnwritable as exc:
            reason = f"{exc.reason} (channel {run.job.channel_id})"
            run.settled += give_up_thread(run.session, job_id=run.job.id or 0, reason=reason)
            log.warning("job %d: Slack answered %s; its thread is given up", run.job.id, reason)

    def _bug(self, run: _JobRun, exc: Exception) -> None:
        """A failure we did not foresee: logged with an error id; the events it happened on are
        given up after MAX_BUG_ROUNDS rounds, and the other jobs go on meanwhile."""
        error_id = uuid.uuid4().hex[:8]
        blamed = [event for event in run.current if event.id is not None]
        log.error(
            "job %d: delivering events %s failed (error id %s)",
            run.job.id,
            [event.id for event in blamed],
            error_id,
            exc_info=exc,
        )
        if not blamed:
            return
        key = blamed[0].id or 0
        rounds = self._bug_rounds[key] = self._bug_rounds.get(key, 0) + 1
        if rounds >= MAX_BUG_ROUNDS:
            self._bug_rounds.pop(key, None)
            reason = f"internal error (error id {error_id}): {type(exc).__name__}, {rounds} rounds"
            run.settled += mark_delivered(run.session, blamed, error=reason)

    # One job's events ----------------------------------------------------------------------

    def _deliver_events(self, run: _JobRun, events: list[JobEvent]) -> None:
        coalesced: list[JobEvent] = []
        for event in events:
            run.current = [event]
            if event.kind == "progress":
                epoch = self._epoch_crossed(run.session, event)
                if epoch is not None:
                    text = milestone_text("epoch", {**event.payload, "epoch": epoch}) or ""
                    self._part(run, event, "epoch", partial(self._reply, run, text))
                coalesced.append(event)
            elif event.kind in HEADER_ONLY:
                coalesced.append(event)
            else:
                self._deliver_milestone(run, event)
                self._settle(run, [event])
        run.current = coalesced
        problem = self._update_header(run)
        if problem:
            for event in coalesced:
                event.delivery_error = problem
        self._settle(run, coalesced)

    def _settle(self, run: _JobRun, events: list[JobEvent]) -> None:
        for event in events:
            self._bug_rounds.pop(event.id or 0, None)
            failed = event.payload.get("_part_errors") or {}
            parts = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
            if parts:
                event.delivery_error = "; ".join(filter(None, [parts, event.delivery_error]))
        run.settled += mark_delivered(run.session, events)

    def _deliver_milestone(self, run: _JobRun, event: JobEvent) -> None:
        payload = event.payload
        if event.kind == "trained" and payload.get("loss_curve_sha256"):
            text = milestone_text("trained", payload) or ""
            curve = self._part(
                run,
                event,
                "loss_curve",
                lambda: self._upload(
                    run,
                    self._blob(payload["loss_curve_sha256"], "loss curve"),
                    "loss.png",
                    "Training loss",
                    text,
                ),
            )
            if not curve:  # the plot is lost, not the news
                self._part(run, event, "reply", lambda: self._reply(run, text))
            return
        if event.kind == "evaluated":
            if payload.get("accuracy") is not None:  # label scores come with a confusion matrix
                self._part(
                    run,
                    event,
                    "confusion",
                    lambda: self._upload(
                        run,
                        self._report_file(payload["report_path"], "confusion.png"),
                        "confusion.png",
                        "Confusion matrix (rows: reference, columns: predicted)",
                        None,
                    ),
                )
            if payload.get("ece") is not None:  # confidences come with a reliability diagram
                self._part(
                    run,
                    event,
                    "reliability",
                    lambda: self._upload(
                        run,
                        self._report_file(payload["report_path"], "reliability.png"),
                        "reliability.png",
                        "Reliability: stated confidence against how often it was right",
                        None,
                    ),
                )
            posted: dict[str, Any] = {}  # the report's ts, kept on the event: links find it

            def post_report() -> None:
                answer = self._post(
                    run, text=eval_report_text(payload), blocks=eval_report_blocks(payload)
                )
                posted[REPORT_TS] = answer["ts"]

            report = self._part(run, event, "report", post_report, record=posted)
            if not report:
                refused = (event.payload.get("_part_errors") or {}).get("report", "")
                self._part(
                    run,
                    event,
                    "report_text",
                    lambda: self._report_as_text(run, payload, refused, posted),
                    record=posted,
                )
            return
        if event.kind == "sweep_finished":
            for part, key, filename, title in (
                ("loss_curves", "loss_curves_sha256", "sweep-loss.png", "Training loss, every run"),
                (
                    "scores",
                    "scores_sha256",
                    "sweep-scores.png",
                    "Eval accuracy and macro-F1 by run",
                ),
            ):
                self._part(
                    run,
                    event,
                    part,
                    partial(self._upload_blob, run, payload[key], filename, title),
                )
            self._part(
                run, event, "reply", lambda: self._reply(run, self._sweep_text(run, payload))
            )
            return
        if event.kind == "ingested":
            self._part(run, event, "stored", partial(self._reply, run, stored_text(payload)))
            self._part(run, event, "report", partial(self._reply, run, report_text(payload)))
            if payload.get("then_job_id"):
                self._part(run, event, "then_root", lambda: self._post_queued_root(run, payload))
            return
        if event.kind == "dataset_rejected":
            self._part(run, event, "reply", partial(self._reply, run, rejected_text(payload)))
            return
        reply = milestone_text(event.kind, payload)
        if reply:
            self._part(run, event, "reply", partial(self._reply, run, reply))

    def _sweep_text(self, run: _JobRun, payload: dict[str, Any]) -> str:
        """A finished sweep's reply: the best run, with a link to its eval report."""
        best, checkpoint = payload.get("best_job_id"), payload.get("best_checkpoint_id")
        if not best:
            return (
                f":checkered_flag: Sweep {payload.get('sweep_id')} finished: no run was "
                "evaluated, so there is no best run."
            )
        waiting = run.session.exec(
            select(JobEvent.id).where(
                JobEvent.job_id == int(best),
                JobEvent.kind == "evaluated",
                col(JobEvent.delivered_at).is_(None),
            )
        ).first()
        if waiting is not None:  # its report comes first, so this reply can link to it
            raise RetryLater(f"the sweep's reply waits for job {best}'s report")
        where = (
            report_messages(run.session, [int(checkpoint)]).get(int(checkpoint))
            if checkpoint is not None
            else None
        )
        link = self.permalinks.link(self.client, *where) if where else None
        report = f", {mrkdwn_link(link, 'its report')}" if link else ""
        return (
            f":checkered_flag: Sweep {payload.get('sweep_id')} finished: the best run by "
            f"macro-F1 is job {best} (checkpoint {checkpoint}{report}); approvers can promote "
            "it from the table above."
        )

    def _part(
        self,
        run: _JobRun,
        event: JobEvent,
        name: str,
        send: Callable[[], str | None],
        *,
        record: dict[str, Any] | None = None,
    ) -> bool:
        """Send one part of an event unless an earlier round already did (or gave it up), then
        remember it, with what ``send`` put in ``record`` (kept on the event's payload); ``send``
        returns a note when it had to fall back. False: given up."""
        payload = event.payload
        done = list(payload.get("_delivered_parts", []))
        errors = dict(payload.get("_part_errors") or {})
        if name in done:
            return True
        if name in errors:
            return False
        try:
            note = send()
        except Rejected as exc:
            log.warning("job %d event %d: %s given up: %s", event.job_id, event.id, name, exc)
            errors[name] = exc.reason
            event.payload = {**payload, "_part_errors": errors}
            run.session.add(event)
            run.session.commit()
            return False
        event.payload = {
            **payload,
            **(record or {}),
            "_delivered_parts": [*done, name],
            **({"_part_errors": {**errors, name: note}} if note else {}),
        }
        run.session.add(event)
        run.session.commit()
        return True

    def _update_header(self, run: _JobRun) -> str | None:
        """Edit the root message to the job's state; the problem if it had to fall back."""
        run.session.refresh(run.job)
        job = run.job
        dataset = run.session.get(Dataset, job.dataset_id) if job.dataset_id else None
        blocks = job_header_blocks(job, dataset)
        header = job_header_text(job)
        if job.sweep_id is not None:  # a sweep's runs share one root: the comparison table
            from bot.sweeps import root_blocks_for

            header, blocks = root_blocks_for(run.session, job)
        channel, thread = run.channel.id, run.thread
        try:
            self._send(
                run,
                lambda: self.client.chat_update(
                    channel=channel, ts=thread, text=header, blocks=blocks
                ),
            )
            return None
        except Rejected as exc:
            plain = _cut(_blocks_text(blocks), FALLBACK_CHARS)
            try:
                self._send(
                    run,
                    lambda: self.client.chat_update(
                        channel=channel, ts=thread, text=plain, blocks=[]
                    ),
                )
            except Rejected as again:
                return f"header: {exc.reason}; as plain text: {again.reason}"
            return f"header: {exc.reason} (shown as plain text)"

    def _post_queued_root(self, run: _JobRun, payload: dict[str, Any]) -> str | None:
        """A training job a dataset check queued (the start form with a file): post its root
        message in the channel and give it that thread, which lets a runner claim it."""
        queued = run.session.get(Job, int(payload["then_job_id"]), populate_existing=True)
        if queued is None or queued.thread_ts:
            return None  # gone, or posted by an earlier round
        dataset = run.session.get(Dataset, queued.dataset_id) if queued.dataset_id else None
        channel = run.channel.id
        posted = self._send(
            run,
            lambda: self.client.chat_postMessage(
                channel=channel,
                text=f"{job_noun(queued)} {queued.id} queued",
                blocks=job_header_blocks(queued, dataset),
            ),
        )
        set_job_thread(run.session, job=queued, thread_ts=str(posted["ts"]))
        return None

    def _post_fresh_root(self, run: _JobRun, reason: str) -> None:
        """The root message is gone: post the job's header anew and move the thread there."""
        job = run.job
        dataset = run.session.get(Dataset, job.dataset_id) if job.dataset_id else None
        note = ":warning: This job's first message was deleted; its thread continues here."
        blocks = [
            *job_header_blocks(job, dataset),
            {"type": "context", "elements": [{"type": "mrkdwn", "text": note}]},
        ]
        text = f"{job_noun(job)} {job.id}: {job.status} (its first message was deleted)"
        channel = run.channel.id
        try:
            posted = self._send(
                run, lambda: self.client.chat_postMessage(channel=channel, text=text, blocks=blocks)
            )
        except Rejected:
            plain = _cut(_blocks_text(blocks), FALLBACK_CHARS)
            try:
                posted = self._send(
                    run, lambda: self.client.chat_postMessage(channel=channel, text=plain)
                )
            except Rejected as exc:
                raise ThreadUnwritable(
                    f"the root message is gone ({reason}) and a new one was refused ({exc.reason})"
                ) from exc
        old, new = run.thread, str(posted["ts"])
        assert job.id is not None
        if move_thread(run.session, job_id=job.id, old_ts=old, new_ts=new, reason=reason):
            log.warning(
                "job %d: root message %s is gone (%s); thread moved to %s", job.id, old, reason, new
            )
        run.session.refresh(job)

    # Slack writes, paced per channel -----------------------------------------------------------

    def _send(self, run: _JobRun, call: Callable[[], Any]) -> Any:
        channel = run.channel
        if self._token_paused_until > self.clock():
            raise RoundSpent("the relay is paused: Slack refuses the bot token")
        if channel.writes >= self.writes_per_round:
            raise RoundSpent(f"channel {channel.id} used its {self.writes_per_round} writes")
        wait = self._last_write.get(channel.id, -math.inf) + self.channel_interval - self.clock()
        if wait > 0:
            time.sleep(wait)
        channel.writes += 1
        try:
            return call()
        except SlackApiError as exc:
            problem = slack_problem(exc)
            if isinstance(problem, RetryLater) and problem.pause_s:
                self._paused_until[channel.id] = self.clock() + problem.pause_s
            raise problem from exc
        except (OSError, HTTPException) as exc:  # refused, reset, timed out
            raise RetryLater(f"network error: {type(exc).__name__}: {exc}") from exc
        finally:
            self._last_write[channel.id] = self.clock()

    def _post(self, run: _JobRun, *, text: str, blocks: list[dict[str, Any]] | None = None) -> Any:
        channel, thread = run.channel.id, run.thread
        return self._send(
            run,
            lambda: self.client.chat_postMessage(
                channel=channel, thread_ts=thread, text=text, blocks=blocks
            ),
        )

    def _reply(self, run: _JobRun, text: str) -> str | None:
        """A plain thread reply; one Slack finds too long goes out cut short."""
        try:
            self._post(run, text=text)
            return None
        except Rejected as exc:
            if not exc.reason.startswith("msg_too_long"):
                raise
        self._post(run, text=_cut(text, FALLBACK_CHARS))
        return f"msg_too_long (sent cut to {FALLBACK_CHARS} characters)"

    def _report_as_text(
        self, run: _JobRun, payload: dict[str, Any], refused: str, posted: dict[str, Any]
    ) -> str:
        """The eval report without its buttons, saying how to promote without them."""
        checkpoint = payload["checkpoint_id"]
        section = _blocks_text(eval_report_blocks(payload))
        note = (
            f"\n_Slack refused the report's buttons ({refused.split(' ')[0]}): an approver can "
            f"promote it with `/finetune promote {checkpoint}`._"
        )
        answer = self._post(run, text=_cut(section, FALLBACK_CHARS - len(note)) + note)
        posted[REPORT_TS] = answer["ts"]
        return "sent as plain text, without the buttons"

    def _upload(
        self, run: _JobRun, content: bytes, filename: str, title: str, comment: str | None
    ) -> None:
        channel, thread = run.channel.id, run.thread
        self._send(
            run,
            lambda: self.client.files_upload_v2(
                channel=channel,
                thread_ts=thread,
                content=content,
                filename=filename,
                title=title,
                initial_comment=comment,
            ),
        )

    def _upload_blob(self, run: _JobRun, sha256: str, filename: str, title: str) -> None:
        self._upload(run, self._blob(sha256, title.lower()), filename, title, None)

    # Artifacts and history -----------------------------------------------------------------

    def _blob(self, sha256: str, what: str) -> bytes:
        try:
            return self.store.read_bytes(sha256)
        except FileNotFoundError:
            raise Rejected(f"artifact missing: the {what} blob {sha256[:12]}… is gone") from None

    def _report_file(self, report_path: str, name: str) -> bytes:
        try:
            return (self.store.path(report_path) / name).read_bytes()
        except FileNotFoundError:
            raise Rejected(f"artifact missing: {report_path}/{name}") from None

    def _epoch_crossed(self, session: Session, event: JobEvent) -> int | None:
        """The epoch number a progress event completed, if it crossed an epoch boundary."""
        epoch = float(event.payload.get("epoch") or 0)
        before = previous_progress(session, event)
        previous = float(before.payload.get("epoch") or 0) if before is not None else 0.0
        return int(epoch) if int(epoch) > int(previous) else None

    # Background loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        try:
            while not stop.is_set():
                try:
                    self.deliver_pending()
                except Exception:
                    log.exception("notifier round failed; the next round retries")
                stop.wait(interval)
        finally:
            self.close()

    def close(self) -> None:
        """Let go of the relay lock (a standing-by notifier takes over)."""
        self.lock.release()


def _blocks_text(blocks: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for block in blocks:
        if block.get("type") == "section":
            lines.append(block["text"]["text"])
        for element in block.get("elements", []) if block.get("type") == "context" else []:
            lines.append(element.get("text", ""))
    return "\n".join(lines)
