"""The job thread: progress in the root message, milestones and plots in the thread, the eval
report with its buttons; exactly once through a storm of 429s and a bot restart; and no job's
Slack trouble (a deleted root, an archived channel, a refused message, a missing plot, a bug)
delays any other job's messages."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
from sqlmodel import col, select

from bot.notifier import MAX_BUG_ROUNDS, MAX_FRESH_ROOTS, Notifier, relay_client
from core.enums import JobStatus
from runner.eval.metrics import label_scores
from runner.plots import confusion_png, loss_curve_png
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import add_job_event, claim_next_job, record_progress, set_job_state
from storage.models import Checkpoint, Job, JobEvent
from tests.bot.test_commands import _dataset

OTHER = "C0OTHER"
REPORT_TEXT = (
    "Evaluation of checkpoint 1: accuracy 50.0%, macro-F1 33.3%. Approvers can approve and "
    "promote it, or reject it."
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _queued_job(slack, engine, channel: str = "C0CHAN") -> Job:
    """A job queued through Slack in ``channel`` (its root message posted), claimed and started
    by a runner, with the runner's own functions."""
    _dataset(slack, engine, channel=channel)
    with new_session(engine) as session:
        job_id = len(session.exec(select(Job.id)).all()) + 1
    slack.command("start lr=5e-6", channel=channel)
    slack.wait_for_thread(engine, job_id)
    with new_session(engine) as session:
        job = claim_next_job(session, owner="runner-1", lease_seconds=60)
        assert job is not None and job.id == job_id
        add_job_event(
            session,
            job_id=job.id,
            kind="started",
            attempt=1,
            owner="runner-1",
            samples=300,
            resumed_from_step=None,
        )
        session.commit()
        return job


def _run_a_job(slack, engine, channel: str = "C0CHAN") -> Job:
    """Queue a job through Slack, then write the events a runner writes, with its functions."""
    job = _queued_job(slack, engine, channel)
    store = ArtifactStore(slack.settings.artifact_dir)
    with new_session(engine) as session:
        for step in range(1, 9):
            record_progress(
                session,
                job_id=job.id,
                token=job.lease_token,
                progress={
                    "step": step,
                    "total_steps": 8,
                    "epoch": step / 4,
                    "loss": 2.0 / step,
                    "tokens_per_s": 1000.0,
                    "elapsed_s": step,
                    "eta_s": 8 - step,
                },
            )
        curve = store.put_bytes(loss_curve_png([2.0 / s + job.id / 100 for s in range(1, 9)]))
        set_job_state(
            session,
            job_id=job.id,
            token=job.lease_token,
            status=JobStatus.evaluating,
            event="trained",
            steps=8,
            seconds=8.0,
            tokens_per_s=1000.0,
            final_loss=0.25,
            loss_curve_sha256=curve.sha256,
        )
        checkpoint = Checkpoint(
            job_id=job.id, step=8, final=True, path=f"checkpoints/{job.id}", base_model="tiny"
        )
        session.add(checkpoint)
        session.commit()
        scores = label_scores(
            ["体育", "财经"], ["体育", None], truncated=[False, True], labels=["体育", "财经"]
        )
        with store.staged_dir(f"evals/{job.id}") as directory:
            (directory / "confusion.png").write_bytes(
                confusion_png(
                    scores["confusion"]["labels"],
                    scores["confusion"]["columns"],
                    scores["confusion"]["matrix"],
                )
            )
        add_job_event(
            session,
            job_id=job.id,
            kind="evaluated",
            checkpoint_id=checkpoint.id,
            report_path=f"evals/{job.id}",
            accuracy=0.5,
            macro_f1=0.3333,
            invalid_rate=0.5,
            truncated_rate=0.5,
            **{
                "predict_rouge-1": 40.0,
                "predict_rouge-2": 30.0,
                "predict_rouge-l": 35.0,
                "predict_bleu-4": 20.0,
            },
            vs_base={"accuracy": 0.3, "macro_f1": 0.2},
            vs_promoted=None,
        )
        session.commit()
        set_job_state(session, job_id=job.id, token=job.lease_token, status=JobStatus.succeeded)
        return session.get(Job, job.id, populate_existing=True)


@pytest.fixture
def notifiers(slack, engine) -> Iterator[Callable[..., Notifier]]:
    """Make notifiers the bot's way (its relay client, the relay lock); all closed at the end."""
    made: list[Notifier] = []

    def make(clock=None, *, db=None, **options) -> Notifier:
        notifier = Notifier(
            db if db is not None else engine,
            relay_client(slack.standin.bot_token, slack.settings.slack_api_url),
            ArtifactStore(slack.settings.artifact_dir),
            channel_interval=options.pop("channel_interval", 0.0),
            clock=clock or Clock(),
            **options,
        )
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close()


def _job(engine, job_id: int) -> Job:
    with new_session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _events(engine, job_id: int) -> list[JobEvent]:
    with new_session(engine) as session:
        return list(
            session.exec(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(col(JobEvent.id))
            )
        )


def _pending(engine) -> list[JobEvent]:
    with new_session(engine) as session:
        return list(session.exec(select(JobEvent).where(col(JobEvent.delivered_at).is_(None))))


def _thread_texts(slack, job: Job, thread: str | None = None) -> list[str]:
    posts = slack.standin.calls_to("chat.postMessage", accepted_only=True)
    return [p.get("text", "") for p in posts if p.get("thread_ts") == (thread or job.thread_ts)]


def _thread_uploads(slack, thread: str) -> list[dict]:
    uploads = slack.standin.calls_to("files.completeUploadExternal", accepted_only=True)
    return [u for u in uploads if u.get("thread_ts") == thread]


def _channel_calls(slack, channel: str) -> list[str]:
    with slack.standin._lock:
        return [
            c.method
            for c in slack.standin.calls
            if (c.params.get("channel") or c.params.get("channel_id")) == channel
        ]


def _assert_whole_story(slack, engine, job: Job) -> None:
    """Everything a finished job tells, each once, in its thread, nothing left or given up."""
    texts = _thread_texts(slack, job)
    assert len(texts) == len(set(texts)) == 4, texts
    assert texts[0].startswith(":runner: Training started on 300 samples")
    assert [t for t in texts if t.startswith("Epoch")] == [
        "Epoch 1 done · step 4/8 · loss 0.5000",
        "Epoch 2 done · step 8/8 · loss 0.2500",
    ]
    assert texts[-1].startswith("Evaluation of checkpoint")
    assert len(_thread_uploads(slack, job.thread_ts)) == 2
    headers = [
        u
        for u in slack.standin.calls_to("chat.update", accepted_only=True)
        if u["ts"] == job.thread_ts
    ]
    assert "· succeeded" in headers[-1]["blocks"][0]["text"]["text"]
    events = _events(engine, job.id)
    assert all(e.delivered_at is not None and e.delivery_error is None for e in events)


def test_the_job_thread_tells_the_whole_story(slack, engine, notifiers) -> None:
    job = _run_a_job(slack, engine)
    notifiers().deliver_pending()
    texts = _thread_texts(slack, job)
    assert texts[0].startswith(":runner: Training started on 300 samples, from the start")
    assert [t for t in texts if t.startswith("Epoch")] == [
        "Epoch 1 done · step 4/8 · loss 0.5000",
        "Epoch 2 done · step 8/8 · loss 0.2500",
    ]
    assert texts[-1] == REPORT_TEXT  # the scores in words, for notifications
    report = next(
        p
        for p in slack.standin.calls_to("chat.postMessage", accepted_only=True)
        if p.get("text") == REPORT_TEXT
    )
    section = report["blocks"][0]["text"]["text"]
    assert "*Accuracy* 50.0% · +30.0 pt vs base" in section and "BLEU-4 20.00" in section
    buttons = report["blocks"][1]["elements"]
    assert [b["action_id"] for b in buttons] == ["approve_checkpoint", "reject_checkpoint"]
    assert buttons[0]["style"] == "primary" and "confirm" in buttons[0]
    assert buttons[1]["style"] == "danger"
    uploads = slack.standin.calls_to("files.completeUploadExternal", accepted_only=True)
    assert len(uploads) == 2
    assert uploads[0]["initial_comment"].startswith(":checkered_flag: Training finished: 8 steps")
    assert all(u["thread_ts"] == job.thread_ts for u in uploads)
    assert len(slack.standin.uploads) == 2
    assert all(data[:4] == b"\x89PNG" for data in slack.standin.uploads.values())
    header = slack.standin.calls_to("chat.update", accepted_only=True)[-1]
    assert header["ts"] == job.thread_ts
    assert "*Fine-tuning job 1* · succeeded" in header["blocks"][0]["text"]["text"]
    assert "step 8/8" in header["blocks"][0]["text"]["text"]
    assert _pending(engine) == []
    _assert_whole_story(slack, engine, job)


def test_a_429_storm_and_a_restart_deliver_every_message_exactly_once(
    slack, engine, notifiers
) -> None:
    job = _run_a_job(slack, engine)
    slack.standin.inject("chat.postMessage", status=429, retry_after=2, times=3)
    slack.standin.inject("files.completeUploadExternal", status=429, retry_after=2, times=2)
    slack.standin.inject("chat.update", status=429, retry_after=1, times=2)
    slack.standin.inject("chat.postMessage", status=500, retry_after=None, times=1)
    clock = Clock()
    notifier = notifiers(clock)
    for round_number in itertools.count():
        assert round_number < 40, "never finished"
        if round_number == 5:  # the bot restarts mid-storm: the old process lets go of the lock
            notifier.close()
            notifier = notifiers(clock)
        notifier.deliver_pending()
        clock.now += 3
        if not _pending(engine):
            break
    texts = _thread_texts(slack, job)
    assert len(texts) == len(set(texts)) == 4  # started, epoch 1, epoch 2, the report
    assert len(slack.standin.calls_to("files.completeUploadExternal", accepted_only=True)) == 2
    assert any(c.status == 429 for c in slack.standin.calls)
    _assert_whole_story(slack, engine, job)


# One job's trouble, another job's messages ------------------------------------------------------


def _fault(kind: str, slack, engine, job: Job) -> None:
    """Make Slack (or the artifact store, or our own code) fail for ``job`` only."""
    standin, channel = slack.standin, job.channel_id
    if kind in ("invalid_blocks", "msg_too_long", "invalid_arguments", "no_text", "new_error"):
        standin.inject("chat.postMessage", error=kind, channel=channel)
    elif kind == "deleted_root":
        standin.delete_message(channel, job.thread_ts)
    elif kind == "archived":
        standin.archive(channel)
    elif kind == "bot_removed":
        standin.kick(channel)
    elif kind == "channel_deleted":
        standin.delete_channel(channel)
    elif kind == "missing_plots":
        store = ArtifactStore(slack.settings.artifact_dir)
        trained = next(e for e in _events(engine, job.id) if e.kind == "trained")
        store.delete_blob(trained.payload["loss_curve_sha256"])
        (store.path(f"evals/{job.id}") / "confusion.png").unlink()
    elif kind == "a_bug":  # an event the notifier cannot render: milestone_text raises KeyError
        with new_session(engine) as session:
            add_job_event(session, job_id=job.id, kind="trained")
            session.commit()
    elif kind == "rate_limited":
        standin.inject("chat.postMessage", status=429, retry_after=30, channel=channel)
    elif kind == "server_error":
        standin.inject("chat.postMessage", status=500, retry_after=None, times=2, channel=channel)
    elif kind == "connection_reset":
        standin.inject("chat.postMessage", reset=True, times=3, channel=channel)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "invalid_blocks",
        "msg_too_long",
        "invalid_arguments",
        "no_text",
        "new_error",
        "deleted_root",
        "archived",
        "bot_removed",
        "channel_deleted",
        "missing_plots",
        "a_bug",
        "rate_limited",
        "server_error",
        "connection_reset",
    ],
)
def test_one_jobs_slack_trouble_delays_no_other_jobs_messages(
    slack, engine, notifiers, kind: str
) -> None:
    troubled = _run_a_job(slack, engine)  # older: its events come first
    other = _run_a_job(slack, engine, channel=OTHER)
    _fault(kind, slack, engine, troubled)
    clock = Clock()
    notifier = notifiers(clock)
    notifier.deliver_pending()
    _assert_whole_story(slack, engine, _job(engine, other.id))  # in the first round, as ever
    for _ in range(MAX_BUG_ROUNDS + 2):  # and the troubled job is settled too, in bounded rounds
        clock.now += 31
        notifier.deliver_pending()
    assert _pending(engine) == []
    posts = _thread_texts(slack, troubled, _job(engine, troubled.id).thread_ts)
    assert len(posts) == len(set(posts))  # nothing posted twice
    assert len(slack.standin.calls_to("chat.postMessage")) < 30  # nor retried forever


def test_a_deleted_root_message_moves_the_thread_to_a_fresh_root(slack, engine, notifiers) -> None:
    job = _run_a_job(slack, engine)
    old_root = job.thread_ts
    slack.standin.delete_message("C0CHAN", old_root)
    notifier = notifiers()
    notifier.deliver_pending()
    moved = _job(engine, job.id)
    assert moved.thread_ts != old_root and moved.thread_error is None
    roots = [
        p
        for p in slack.standin.calls_to("chat.postMessage", accepted_only=True)
        if p["channel"] == "C0CHAN" and not p.get("thread_ts")
    ]
    assert len(roots) == 2 and roots[1]["_ts"] == moved.thread_ts
    assert "first message was deleted" in roots[1]["blocks"][-1]["elements"][0]["text"]
    assert "*Fine-tuning job 1* · succeeded" in roots[1]["blocks"][0]["text"]["text"]
    assert _thread_texts(slack, job, old_root) == []
    _assert_whole_story(slack, engine, moved)
    record = next(e for e in _events(engine, job.id) if e.kind == "thread_moved")
    assert record.payload == {
        "from_ts": old_root,
        "to_ts": moved.thread_ts,
        "reason": "thread_not_found",
    }
    with new_session(engine) as session:  # later events go to the new thread
        add_job_event(session, job_id=job.id, kind="status", message="a later word")
        session.commit()
    notifier.deliver_pending()
    assert _thread_texts(slack, moved)[-1] == "a later word"
    assert (
        len([p for p in slack.standin.calls_to("chat.postMessage") if not p.get("thread_ts")]) == 2
    )


def test_a_root_deleted_again_and_again_is_reposted_a_bounded_number_of_times(
    slack, engine, notifiers
) -> None:
    job = _run_a_job(slack, engine)
    notifier = notifiers()
    for _ in range(MAX_FRESH_ROOTS + 1):  # someone deletes every root the bot posts
        slack.standin.delete_message("C0CHAN", _job(engine, job.id).thread_ts)
        with new_session(engine) as session:
            add_job_event(session, job_id=job.id, kind="status", message="still going")
            session.commit()
        notifier.deliver_pending()
    roots = [p for p in slack.standin.calls_to("chat.postMessage") if not p.get("thread_ts")]
    assert len(roots) == 1 + MAX_FRESH_ROOTS  # the first one, then the bounded reposts
    given_up = _job(engine, job.id)
    assert given_up.thread_error == (
        f"thread_not_found: its root message was deleted {MAX_FRESH_ROOTS + 1} times "
        "(channel C0CHAN)"
    )
    assert _pending(engine) == []


def test_an_archived_channel_gives_up_the_thread_and_stops_calling_slack(
    slack, engine, notifiers
) -> None:
    job = _run_a_job(slack, engine)
    slack.standin.archive("C0CHAN")
    before = len(_channel_calls(slack, "C0CHAN"))
    notifier = notifiers()
    notifier.deliver_pending()
    assert len(_channel_calls(slack, "C0CHAN")) == before + 1  # the one Slack refused
    assert _job(engine, job.id).thread_error == "is_archived (channel C0CHAN)"
    events = _events(engine, job.id)
    assert all(e.delivered_at is not None for e in events)
    assert {e.delivery_error for e in events} == {"thread given up: is_archived (channel C0CHAN)"}
    with new_session(engine) as session:
        add_job_event(session, job_id=job.id, kind="status", message="nobody will see this")
        session.commit()
    notifier.deliver_pending()
    assert len(_channel_calls(slack, "C0CHAN")) == before + 1  # no further Slack calls
    later = _events(engine, job.id)[-1]
    assert later.delivered_at is not None
    assert later.delivery_error == "thread given up: is_archived (channel C0CHAN)"


def test_missing_plots_are_recorded_and_the_rest_of_the_story_arrives(
    slack, engine, notifiers
) -> None:
    job = _run_a_job(slack, engine)
    _fault("missing_plots", slack, engine, job)
    notifiers().deliver_pending()
    texts = _thread_texts(slack, job)
    assert len(texts) == 5
    assert texts[3].startswith(":checkered_flag: Training finished: 8 steps")  # the plot's comment
    assert texts[4] == REPORT_TEXT
    report = slack.standin.calls_to("chat.postMessage", accepted_only=True)[-1]
    assert [b["action_id"] for b in report["blocks"][1]["elements"]] == [
        "approve_checkpoint",
        "reject_checkpoint",
    ]
    assert slack.standin.calls_to("files.getUploadURLExternal") == []  # nothing to upload
    errors = {e.kind: e.delivery_error for e in _events(engine, job.id)}
    trained = next(e for e in _events(engine, job.id) if e.kind == "trained")
    assert errors["trained"] == (
        f"loss_curve: artifact missing: the loss curve blob "
        f"{trained.payload['loss_curve_sha256'][:12]}… is gone"
    )
    assert errors["evaluated"] == "confusion: artifact missing: evals/1/confusion.png"
    assert errors["started"] is None and _pending(engine) == []


def test_refused_report_buttons_fall_back_to_text_naming_the_promote_command(
    slack, engine, notifiers
) -> None:
    job = _run_a_job(slack, engine)
    slack.standin.inject("chat.postMessage", error="invalid_blocks", match=lambda p: "blocks" in p)
    notifiers().deliver_pending()
    texts = _thread_texts(slack, job)
    assert len(texts) == 4 and "Evaluation of checkpoint 1" in texts[-1]
    assert "*Accuracy* 50.0% · +30.0 pt vs base" in texts[-1]
    assert "an approver can promote it with `/finetune promote 1`" in texts[-1]
    evaluated = next(e for e in _events(engine, job.id) if e.kind == "evaluated")
    assert evaluated.delivery_error == (
        "report: invalid_blocks; report_text: sent as plain text, without the buttons"
    )
    assert len(_thread_uploads(slack, job.thread_ts)) == 2


def test_a_report_with_confidences_uploads_the_reliability_plot_and_offers_the_mistakes(
    slack, engine, notifiers
) -> None:
    job = _run_a_job(slack, engine)
    store = ArtifactStore(slack.settings.artifact_dir)
    (store.path(f"evals/{job.id}") / "reliability.png").write_bytes(loss_curve_png([0.1, 0.2]))
    with new_session(engine) as session:  # the keys an evaluation with confidences adds
        event = session.exec(
            select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.kind == "evaluated")
        ).one()
        event.payload = {
            **event.payload,
            "evaluation_id": 3,
            "ece": 0.08,
            "per_class": {"体育": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2}},
        }
        session.add(event)
        session.commit()
    notifiers().deliver_pending()
    uploads = _thread_uploads(slack, job.thread_ts)
    titles = [f.get("title") for u in uploads for f in u.get("files") or []]
    assert titles[-1] == "Reliability: stated confidence against how often it was right"
    assert len(uploads) == 3
    report = slack.standin.calls_to("chat.postMessage", accepted_only=True)[-1]
    assert report["thread_ts"] == job.thread_ts
    assert "*Calibration* ECE 8.0%" in report["blocks"][0]["text"]["text"]
    assert report["blocks"][1]["text"]["text"].startswith("*Per class*")
    assert [b["elements"][0]["action_id"] for b in report["blocks"][2:]] == [
        "approve_checkpoint",
        "show_mistakes",
    ]
    evaluated = next(e for e in _events(engine, job.id) if e.kind == "evaluated")
    assert evaluated.delivery_error is None


def test_a_huge_failure_is_cut_to_fit_in_the_reply_and_in_the_header(
    slack, engine, notifiers
) -> None:
    job = _queued_job(slack, engine)
    error = "CUDA out of memory. " * 2_500  # 50,000 characters: over every Slack limit
    with new_session(engine) as session:
        set_job_state(
            session, job_id=job.id, token=job.lease_token, status=JobStatus.failed, error=error
        )
    notifiers().deliver_pending()
    reply = _thread_texts(slack, job)[-1]
    assert reply.startswith(":x: Failed: CUDA out of memory.") and len(reply) <= 3_000
    refused = [(c.method, c.error) for c in slack.standin.calls if not c.accepted]
    assert refused == [("chat.postMessage", "msg_too_long")]  # the reply; the header fits at once
    header = slack.standin.calls_to("chat.update", accepted_only=True)[-1]
    section = header["blocks"][0]["text"]["text"]
    assert header["ts"] == job.thread_ts
    assert section.startswith(":x: *Fine-tuning job 1* · failed") and len(section) <= 3_000
    assert ":warning: CUDA out of memory." in section and section.endswith("…")
    failed = next(e for e in _events(engine, job.id) if e.kind == "failed")
    assert failed.delivery_error == "reply: msg_too_long (sent cut to 3000 characters)"
    assert _pending(engine) == []


# Retried, and delivered once -------------------------------------------------------------------


def test_connection_resets_are_retried_and_every_message_arrives_once(
    slack, engine, notifiers
) -> None:
    job = _run_a_job(slack, engine)
    slack.standin.inject("chat.postMessage", reset=True, times=1)  # retried at once by slack_sdk
    slack.standin.inject("chat.update", reset=True, times=2)  # and again: left for the next round
    clock = Clock()
    notifier = notifiers(clock)
    notifier.deliver_pending()
    assert any(c.status == 0 for c in slack.standin.calls)
    assert len(_pending(engine)) > 0  # the header's events wait
    clock.now += 1
    notifier.deliver_pending()
    _assert_whole_story(slack, engine, job)


def test_a_reset_after_slack_posted_posts_again_at_least_once(slack, engine, notifiers) -> None:
    """The truth behind "at least once": Slack took the message, the answer never came."""
    job = _run_a_job(slack, engine)
    slack.standin.inject(
        "chat.postMessage",
        reset=True,
        after_accept=True,
        match=lambda p: p.get("text", "").startswith(":runner:"),
    )
    notifiers().deliver_pending()
    texts = _thread_texts(slack, job)
    assert len(texts) == 5 and texts[0] == texts[1]  # the one message Slack took twice
    assert len(set(texts)) == 4 and _pending(engine) == []


def test_a_refused_bot_token_pauses_the_relay_and_gives_up_nothing(
    slack, engine, notifiers
) -> None:
    job = _run_a_job(slack, engine)
    slack.standin.inject("chat.postMessage", error="invalid_auth")
    clock = Clock()
    notifier = notifiers(clock)
    notifier.deliver_pending()
    calls = len(slack.standin.calls)
    notifier.deliver_pending()  # paused: not one call
    assert len(slack.standin.calls) == calls
    assert all(e.delivery_error is None for e in _events(engine, job.id))
    assert _job(engine, job.id).thread_error is None
    clock.now += 61  # the token works again
    notifier.deliver_pending()
    _assert_whole_story(slack, engine, job)


# Fair rounds ---------------------------------------------------------------------------------


def test_a_backlog_in_a_paused_channel_does_not_starve_later_jobs(slack, engine, notifiers) -> None:
    backlog = _queued_job(slack, engine)
    with new_session(engine) as session:
        for step in range(1, 601):
            add_job_event(
                session,
                job_id=backlog.id,
                kind="progress",
                step=step,
                total_steps=600,
                epoch=step / 600,
                loss=1.0,
            )
        session.commit()
    slack.standin.inject("chat.postMessage", status=429, retry_after=60, channel="C0CHAN")
    later = _queued_job(slack, engine, channel=OTHER)
    clock = Clock()
    notifier = notifiers(clock)
    notifier.deliver_pending()
    assert _thread_texts(slack, later)[0].startswith(":runner: Training started")
    assert all(e.delivered_at is not None for e in _events(engine, later.id))
    with new_session(engine) as session:  # and again while the backlog's channel is paused
        add_job_event(session, job_id=later.id, kind="status", message="still here")
        session.commit()
    notifier.deliver_pending()
    assert _thread_texts(slack, later)[-1] == "still here"
    assert _thread_texts(slack, backlog) == []  # it waits for its Retry-After


def test_a_busy_channel_is_paced_without_holding_up_other_channels(
    slack, engine, notifiers
) -> None:
    busy = _run_a_job(slack, engine)
    other = _run_a_job(slack, engine, channel=OTHER)
    start = len(slack.standin.calls)
    notifiers(channel_interval=0.2).deliver_pending()
    calls = slack.standin.calls[start:]
    first_other = next(
        i for i, c in enumerate(calls) if c.params.get("thread_ts") == other.thread_ts
    )
    last_busy = max(i for i, c in enumerate(calls) if c.params.get("thread_ts") == busy.thread_ts)
    assert first_other < last_busy  # the channels were served side by side
    _assert_whole_story(slack, engine, _job(engine, busy.id))
    _assert_whole_story(slack, engine, _job(engine, other.id))
