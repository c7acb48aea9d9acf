"""The job thread: progress in the root message, milestones and plots in the thread, the eval
report with its buttons; exactly once through a storm of 429s and a bot restart."""

from __future__ import annotations

import itertools

from slack_sdk import WebClient
from sqlmodel import col, select

from bot.notifier import Notifier
from core.enums import JobStatus
from runner.eval.metrics import label_scores
from runner.plots import confusion_png, loss_curve_png
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import add_job_event, claim_next_job, record_progress, set_job_state
from storage.models import Checkpoint, Job, JobEvent
from tests.bot.test_commands import _dataset


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run_a_job(slack, engine) -> Job:
    """Queue a job through Slack, then write the events a runner writes, with its functions."""
    _dataset(slack, engine)
    slack.command("start lr=5e-6")
    slack.standin.wait_for("chat.postMessage")
    slack.wait_for_thread(engine, 1)
    store = ArtifactStore(slack.settings.artifact_dir)
    with new_session(engine) as session:
        job = claim_next_job(session, owner="runner-1", lease_seconds=60)
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
        for step in range(1, 9):
            record_progress(
                session,
                job_id=job.id,
                owner="runner-1",
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
        curve = store.put_bytes(loss_curve_png([2.0 / s for s in range(1, 9)]))
        set_job_state(
            session,
            job_id=job.id,
            owner="runner-1",
            status=JobStatus.evaluating,
            event="trained",
            steps=8,
            seconds=8.0,
            tokens_per_s=1000.0,
            final_loss=0.25,
            loss_curve_sha256=curve.sha256,
        )
        checkpoint = Checkpoint(
            job_id=job.id, step=8, final=True, path="checkpoints/x", base_model="tiny"
        )
        session.add(checkpoint)
        session.commit()
        scores = label_scores(
            ["体育", "财经"], ["体育", None], truncated=[False, True], labels=["体育", "财经"]
        )
        with store.staged_dir("evals/x") as directory:
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
            report_path="evals/x",
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
        set_job_state(session, job_id=job.id, owner="runner-1", status=JobStatus.succeeded)
        return session.get(Job, job.id, populate_existing=True)


def _notifier(slack, engine, clock=None) -> Notifier:
    client = WebClient(token=slack.standin.bot_token, base_url=slack.settings.slack_api_url)
    return Notifier(
        engine,
        client,
        ArtifactStore(slack.settings.artifact_dir),
        channel_interval=0.0,
        clock=clock or Clock(),
    )


def _thread_texts(slack, job: Job) -> list[str]:
    posts = slack.standin.calls_to("chat.postMessage", accepted_only=True)
    return [p.get("text", "") for p in posts if p.get("thread_ts") == job.thread_ts]


def test_the_job_thread_tells_the_whole_story(slack, engine) -> None:
    job = _run_a_job(slack, engine)
    _notifier(slack, engine).deliver_pending()
    texts = _thread_texts(slack, job)
    assert texts[0].startswith(":runner: Training started on 300 samples, from the start")
    assert [t for t in texts if t.startswith("Epoch")] == [
        "Epoch 1 done · step 4/8 · loss 0.5000",
        "Epoch 2 done · step 8/8 · loss 0.2500",
    ]
    assert texts[-1] == "Evaluation of checkpoint 1"
    report = next(
        p
        for p in slack.standin.calls_to("chat.postMessage", accepted_only=True)
        if p.get("text") == "Evaluation of checkpoint 1"
    )
    section = report["blocks"][0]["text"]["text"]
    assert "*Accuracy* 50.0% (+30.0 pt) vs base" in section and "BLEU-4 20.00" in section
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
    with new_session(engine) as session:
        assert (
            session.exec(select(JobEvent).where(col(JobEvent.delivered_at).is_(None))).all() == []
        )


def test_a_429_storm_and_a_restart_deliver_every_message_exactly_once(slack, engine) -> None:
    job = _run_a_job(slack, engine)
    slack.standin.inject("chat.postMessage", status=429, retry_after=2, times=3)
    slack.standin.inject("files.completeUploadExternal", status=429, retry_after=2, times=2)
    slack.standin.inject("chat.update", status=429, retry_after=1, times=2)
    slack.standin.inject("chat.postMessage", status=500, retry_after=None, times=1)
    clock = Clock()
    notifier = _notifier(slack, engine, clock)
    for round_number in itertools.count():
        assert round_number < 40, "never finished"
        if round_number == 5:
            notifier = _notifier(slack, engine, clock)  # the bot restarts mid-storm
        notifier.deliver_pending()
        clock.now += 3
        with new_session(engine) as session:
            if not session.exec(select(JobEvent).where(col(JobEvent.delivered_at).is_(None))).all():
                break
    texts = _thread_texts(slack, job)
    assert len(texts) == len(set(texts)) == 4  # started, epoch 1, epoch 2, the report
    assert len(slack.standin.calls_to("files.completeUploadExternal", accepted_only=True)) == 2
    assert any(c.status == 429 for c in slack.standin.calls)
