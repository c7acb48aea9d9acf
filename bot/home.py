"""The App Home: ``app_home_opened`` publishes (``views.publish``) each user's own home; the
notifier republishes it when a job it shows changes state (the requester's home, and the homes
opened in this process that show the job: approvers', and anyone's for a deployment job), at
most once per ``HOME_REFRESH_SECONDS`` per user (``HomeRefresher``).

What a home shows. Channels are tenants (bot/scope.py), and the bot cannot tell which channels a
user is in (it has no ``channels:read`` scope, and the stand-in no membership): so a home shows
the model serving now (one for the whole deployment: every channel's ``/classify`` answers with
it), and, for a user, the jobs they started (in whatever channel: they typed the command there)
and the deployment's (started outside Slack, which every channel sees), with those jobs'
checkpoints; its scores only when the serving checkpoint is one of those. An approver, who may
reach every channel with ``all``, sees every channel's. Nothing else of another channel shows.

Its buttons are checked here, on the server, for every click: Promote is the eval report's
``approve_checkpoint`` (bot/actions.py: approvers only, compare-and-set on the checkpoint); Cancel
is ``/finetune cancel``'s check (``cancel_job_as``: the requester or an approver); New fine-tune
opens the start form with a channel picker, limited on submission to channels where the user has
started jobs. The answer to a click (done, or refused and why) is shown at the top of the home,
which is published again; a Slack that refuses the home's blocks gets a plain-text home instead.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from http.client import HTTPException
from typing import TYPE_CHECKING, Any

from slack_sdk.errors import SlackApiError
from sqlalchemy import or_, true
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from bot.auth import Approvers
from bot.home_blocks import (
    CANCEL_JOB,
    MAX_CHECKPOINTS,
    MAX_JOBS,
    MAX_SWEEPS,
    NEW_JOB,
    Board,
    HomeData,
    Viewer,
    home_fallback_view,
    home_view,
    row_key,
)
from bot.permalinks import Permalinks, mrkdwn_link, report_messages
from bot.slack_errors import Rejected, RetryLater, TokenRefused, Undelivered, slack_problem
from core.enums import JobStatus
from core.errors import FinetuneError
from storage.db import new_session
from storage.evaluations import checkpoint_evaluation, checkpoint_evaluations, current_promotion
from storage.models import Checkpoint, Dataset, Job
from storage.types import utcnow

if TYPE_CHECKING:
    from bot.commands import BotContext

log = logging.getLogger(__name__)

ACTIVE = (JobStatus.queued.value, JobStatus.running.value, JobStatus.evaluating.value)
# Job events that change what a home shows: a state, a checkpoint, its scores.
HOME_EVENTS = {
    "queued",
    "claimed",
    "started",
    "running",
    "requeued",
    "checkpoint",
    "evaluating",
    "evaluated",
    "cancel_requested",
    "succeeded",
    "failed",
    "cancelled",
    "distill_started",  # a distillation's claimed → running, and its end
    "distilled",
}
TOKEN_PAUSE_S = 60.0


# What a home shows ------------------------------------------------------------------------------


def viewer_of(approvers: Approvers, user: str) -> Viewer:
    """``user`` as a home sees them; when Slack cannot say who the approvers are, a plain user."""
    try:
        return Viewer(user, approvers.allows(user))
    except FinetuneError:
        return Viewer(user, False, approvers_unknown=True)


def sees_job(viewer: Viewer, job: Job) -> bool:
    return viewer.approver or job.channel_id is None or job.requested_by == viewer.user


def _visible(viewer: Viewer) -> Any:
    """The SQL condition of ``sees_job``."""
    if viewer.approver:
        return true()
    return or_(col(Job.requested_by) == viewer.user, col(Job.channel_id).is_(None))


def read_home(session: Session, viewer: Viewer, *, base_model: str) -> HomeData:
    promotion = current_promotion(session)
    serving_metrics, serving_visible = None, True
    if promotion is not None and promotion.checkpoint_id is not None:
        serving = session.get(Checkpoint, promotion.checkpoint_id)
        job = session.get(Job, serving.job_id) if serving is not None else None
        serving_visible = job is not None and sees_job(viewer, job)
        if serving_visible:
            found = checkpoint_evaluation(session, checkpoint_id=promotion.checkpoint_id)
            serving_metrics = found.metrics if found is not None else None
    jobs = session.exec(
        select(Job)
        .where(col(Job.status).in_(ACTIVE), _visible(viewer))
        .order_by(col(Job.id))
        .limit(MAX_JOBS)
    ).all()
    rows = session.exec(
        select(Checkpoint, Job)
        .join(Job, col(Job.id) == col(Checkpoint.job_id))
        .where(_visible(viewer))
        .order_by(col(Checkpoint.id).desc())
        .limit(MAX_CHECKPOINTS)
    ).all()
    scores = checkpoint_evaluations(
        session, checkpoint_ids=[c.id for c, _ in rows if c.id is not None]
    )
    datasets: dict[int, Dataset | None] = {}

    def dataset_of(job: Job) -> Dataset | None:
        if job.dataset_id is None:
            return None
        if job.dataset_id not in datasets:
            datasets[job.dataset_id] = session.get(Dataset, job.dataset_id)
        return datasets[job.dataset_id]

    board = []
    for checkpoint, job in rows:
        found = scores.get(checkpoint.id) if checkpoint.id is not None else None
        board.append(
            Board(checkpoint, job, dataset_of(job), found.metrics if found is not None else None)
        )
    refs: dict[str, tuple[str, str, str]] = {}
    for job in jobs:
        if job.channel_id and job.thread_ts:
            refs[row_key("job", job.id)] = (job.channel_id, job.thread_ts, "thread")
    linked = [c.id for c, _ in rows if c.id is not None]
    if serving_visible and promotion is not None and promotion.checkpoint_id is not None:
        linked.append(promotion.checkpoint_id)
    reports = report_messages(session, linked)
    for checkpoint, job in rows:
        if job.channel_id and job.thread_ts:
            refs[row_key("checkpoint", checkpoint.id)] = (job.channel_id, job.thread_ts, "thread")
    for checkpoint_id, (channel, ts) in reports.items():
        refs[row_key("checkpoint", checkpoint_id)] = (channel, ts, "report")
    sweeps = _recent_sweeps(session, viewer, refs)
    return HomeData(
        sweeps=sweeps,
        refs=refs,
        base_model=base_model,
        promotion=promotion,
        serving_metrics=serving_metrics,
        serving_visible=serving_visible,
        active=[(job, dataset_of(job)) for job in jobs],
        board=board,
        now=utcnow(),
    )


def _recent_sweeps(
    session: Session, viewer: Viewer, refs: dict[str, tuple[str, str, str]]
) -> list[tuple[int, str | None, int, int, bool, str | None]]:
    """The newest sweeps the viewer sees (their own, the deployment's; every one for approvers):
    how many runs ended and the best run so far; their threads go in ``refs``."""
    from bot.sweeps import best_text
    from storage.models import Sweep
    from storage.sweeps import best_row, sweep_rows

    query = select(Sweep).order_by(col(Sweep.id).desc()).limit(MAX_SWEEPS)
    if not viewer.approver:
        query = query.where(
            or_(col(Sweep.requested_by) == viewer.user, col(Sweep.channel_id).is_(None))
        )
    out = []
    for found in session.exec(query).all():
        assert found.id is not None
        if found.channel_id and found.thread_ts:
            refs[row_key("sweep", found.id)] = (found.channel_id, found.thread_ts, "thread")
        rows = sweep_rows(session, found)
        ended = sum(JobStatus(r.status).finished for r in rows)
        best = best_row(rows)
        out.append(
            (
                found.id,
                found.channel_id,
                ended,
                len(rows),
                found.finished_at is not None,
                best_text(best) if best is not None else None,
            )
        )
    return out


def user_channels(session: Session, *, user: str) -> list[str]:
    """The channels where ``user`` started jobs (or shared datasets), the latest first: where
    the home's start form may post a job (the bot knows they were there)."""
    rows = session.exec(
        select(Job.channel_id, Job.id)
        .where(Job.requested_by == user, col(Job.channel_id).is_not(None))
        .order_by(col(Job.id).desc())
        .limit(200)
    ).all()
    seen: list[str] = []
    for channel, _ in rows:
        if channel and channel not in seen:
            seen.append(channel)
    return seen


# Publishing -------------------------------------------------------------------------------------


def publish_home(
    client: Any,
    *,
    db: Engine,
    approvers: Approvers,
    base_model: str,
    user: str,
    notice: str | None = None,
    permalinks: Permalinks | None = None,
) -> None:
    """Publish ``user``'s home, its rows linked to their threads and reports (``permalinks``
    caches Slack's links; a row Slack gives none for shows none). A home Slack refuses
    (``invalid_arguments``, ``invalid_blocks``…) is published again as plain text; raises
    ``RetryLater`` (rate limited, Slack or the network down), ``TokenRefused``, or ``Rejected``
    when the plain one is refused too."""
    viewer = viewer_of(approvers, user)
    with new_session(db) as session:
        data = read_home(session, viewer, base_model=base_model)
    if permalinks is not None:
        for key, (channel, ts, words) in data.refs.items():
            link = permalinks.link(client, channel, ts)
            if link:
                data.links[key] = mrkdwn_link(link, words)
    try:
        _publish(client, user, home_view(data, viewer, notice=notice))
    except Rejected as exc:
        log.warning("Slack refused %s's home (%s); publishing it as plain text", user, exc.reason)
        text = (
            (notice + "\n" if notice else "")
            + f"This home could not be shown (Slack answered `{exc.reason.split(' ')[0]}`). "
            "`/finetune list` and `/finetune checkpoints` in a channel show its jobs and "
            "checkpoints."
        )
        _publish(client, user, home_fallback_view(text))


def _publish(client: Any, user: str, view: dict[str, Any]) -> None:
    try:
        client.views_publish(user_id=user, view=view)
    except SlackApiError as exc:
        raise slack_problem(exc) from exc
    except (OSError, HTTPException) as exc:
        raise RetryLater(f"network error: {type(exc).__name__}: {exc}") from exc


class HomeViewers:
    """Who opened their App Home (or clicked in it) since this bot process started: the homes a
    job's change is pushed to besides its requester's. Held in memory, shared by the listeners
    and the notifier of one process; after a restart a home is pushed again once its user opens
    it (Slack's ``app_home_opened`` publishes it fresh meanwhile)."""

    def __init__(self) -> None:
        self._users: set[str] = set()
        self._lock = threading.Lock()

    def add(self, user: str) -> None:
        with self._lock:
            self._users.add(user)

    def users(self) -> list[str]:
        with self._lock:
            return sorted(self._users)


class HomeRefresher:
    """Republishes homes after job state changes (the notifier calls ``job_changed``, then
    ``flush`` once a round): the requester's, and that of everyone who opened their home and
    sees the job there (``viewers``: approvers see every job, anyone a deployment job; the rules
    of ``sees_job``). Each user's at most once per ``interval`` seconds, the last state always
    published in the end (a change inside the interval waits for it).

    Slack's answers: rate limited (429, Retry-After) pauses every home for that long, and they
    wait; Slack or the network down: they wait for the next round; the token refused: every
    home waits a minute; a home refused even as plain text is given up (logged)."""

    def __init__(
        self,
        db: Engine,
        client: Any,
        approvers: Approvers,
        base_model: str,
        *,
        interval: float,
        clock: Any = time.monotonic,
        permalinks: Permalinks | None = None,
        viewers: HomeViewers | None = None,
    ) -> None:
        self.db = db
        self.permalinks = permalinks if permalinks is not None else Permalinks()
        self.viewers = viewers if viewers is not None else HomeViewers()
        self.client = client
        self.approvers = approvers
        self.base_model = base_model
        self.interval = interval
        self.clock = clock
        self._pending: set[str] = set()
        self._last: dict[str, float] = {}
        self._paused_until = -math.inf
        self._lock = threading.Lock()

    def note(self, user: str) -> None:
        with self._lock:
            self._pending.add(user)

    def job_changed(self, job: Job) -> None:
        """``job`` changed what a home shows: note the homes that show it."""
        users = {job.requested_by} if job.requested_by else set()
        users.update(
            user
            for user in self.viewers.users()
            if user not in users and sees_job(viewer_of(self.approvers, user), job)
        )
        with self._lock:
            self._pending.update(users)

    def flush(self) -> int:
        """Publish the homes that are due; returns how many were published."""
        with self._lock:
            now = self.clock()
            if self._paused_until > now:
                return 0
            due = sorted(
                u for u in self._pending if self._last.get(u, -math.inf) + self.interval <= now
            )
        published = 0
        for user in due:
            try:
                publish_home(
                    self.client,
                    db=self.db,
                    approvers=self.approvers,
                    base_model=self.base_model,
                    user=user,
                    permalinks=self.permalinks,
                )
                published += 1
            except RetryLater as exc:
                log.warning("%s's home waits: %s", user, exc.reason)
                if exc.pause_s:
                    with self._lock:
                        self._paused_until = self.clock() + exc.pause_s
                break
            except TokenRefused as exc:
                log.error("Slack refuses the bot token (%s): homes wait", exc.reason)
                with self._lock:
                    self._paused_until = self.clock() + TOKEN_PAUSE_S
                break
            except Undelivered as exc:  # Rejected, even as plain text: given up
                log.warning("%s's home was not published: %s", user, exc.reason)
            with self._lock:
                self._pending.discard(user)
                self._last[user] = self.clock()
        return published


# Listeners --------------------------------------------------------------------------------------


def register(app: Any, ctx: BotContext) -> None:
    @app.event("app_home_opened")
    def handle_home_opened(ack: Any, event: dict[str, Any], client: Any) -> None:
        ack()
        if event.get("tab", "home") != "home":
            return  # the Messages tab
        show_home(ctx, client, event["user"])

    @app.action(CANCEL_JOB)
    def handle_cancel(ack: Any, body: dict[str, Any], client: Any) -> None:
        ack()
        user = body["user"]["id"]
        show_home(ctx, client, user, notice=_cancel(ctx, user, body["actions"][0]["value"]))

    @app.action(NEW_JOB)
    def handle_new_job(ack: Any, body: dict[str, Any], client: Any) -> None:
        ack()
        user = body["user"]["id"]
        try:
            _open_start_form(ctx, client, user, body["trigger_id"])
        except SlackApiError as exc:  # e.g. expired_trigger: said at the top of their home
            code = exc.response.get("error")
            log.warning("could not open the start form for %s: %s", user, code)
            notice = (
                f":warning: Slack did not open the form (`{code}`); click *New fine-tune* "
                "again, or type `/finetune start` in a channel."
            )
            show_home(ctx, client, user, notice=notice)


def in_home(body: dict[str, Any]) -> bool:
    """Whether a click came from a home (a view, not a message in a channel)."""
    return (body.get("container") or {}).get("type") == "view" and "channel" not in body


def show_home(ctx: BotContext, client: Any, user: str, *, notice: str | None = None) -> None:
    """Publish ``user``'s home from a listener (they opened it or clicked in it: from now on
    the notifier pushes it too); a failure is logged (the home stays as it was, and the next open
    or state change publishes it again)."""
    ctx.home_viewers.add(user)
    try:
        publish_home(
            client,
            db=ctx.db,
            approvers=ctx.approvers,
            base_model=ctx.base_model,
            user=user,
            notice=notice,
            permalinks=ctx.permalinks,
        )
    except Undelivered as exc:
        log.warning("%s's home was not published: %s", user, exc.reason)


def _cancel(ctx: BotContext, user: str, value: str) -> str:
    from bot.job_commands import cancel_job_as, cancelled_text

    viewer = viewer_of(ctx.approvers, user)
    try:
        with new_session(ctx.db) as session:
            job = session.get(Job, int(value)) if value.isdigit() else None
            if job is None or not sees_job(viewer, job):
                return f":warning: No job {value} here; nothing was changed."
            return ":octagonal_sign: " + cancelled_text(
                cancel_job_as(session, ctx.approvers, job, user=user)
            )
    except FinetuneError as exc:
        return f":lock: {exc.message}; nothing was changed."


def _open_start_form(ctx: BotContext, client: Any, user: str, trigger_id: str) -> None:
    """The `/finetune start` form, with a channel picker (the job's thread goes there) set to
    the channel where the user last started a job; its datasets are that channel's."""
    from bot.views import start_modal
    from storage.datasets import latest_dataset, visible_datasets

    with new_session(ctx.db) as session:
        channels = user_channels(session, user=user)
        channel = channels[0] if channels else None
        datasets = visible_datasets(session, channel_id=channel or "", limit=100)
        latest = latest_dataset(session, channel_id=channel) if channel else None
    client.views_open(
        trigger_id=trigger_id,
        view=start_modal(
            datasets,
            channel_id=channel or "",
            default_dataset_id=latest.id if latest else None,
            pick_channel=True,
        ),
    )
