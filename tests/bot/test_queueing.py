"""Queueing a job from Slack: the root message is posted before a runner can claim the job (or the
job is cancelled and the user told how to fix it), per-user limits with the numbers, and
`/finetune evaluate` as a job of its own. Over signed HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

from sqlmodel import select

from core.enums import JobStatus
from storage.db import new_session
from storage.jobs import claim_next_job
from storage.models import Checkpoint, Job, JobEvent
from tests.bot.conftest import APPROVER, ingest


def _jobs(engine) -> list[Job]:
    with new_session(engine) as session:
        return list(session.exec(select(Job).order_by(Job.id)).all())


def _claim(engine) -> Job | None:
    with new_session(engine) as session:
        return claim_next_job(session, owner="runner-test", lease_seconds=60)


def _start(slack, engine, job_id: int, user: str = "U0USER") -> None:
    assert slack.command("start lr=5e-6", user=user).status_code == 200
    slack.wait_for_thread(engine, job_id)


def test_a_root_message_slack_refuses_cancels_the_job_and_says_how_to_fix_it(slack, engine) -> None:
    ingest(slack, engine, channel="C0GONE")
    ingest(slack, engine, channel="C0ARCHIVED")
    slack.standin.kick("C0GONE")
    slack.standin.archive("C0ARCHIVED")

    refused = slack.ask("start lr=5e-6", channel="C0GONE")
    assert refused["response_type"] == "ephemeral"
    assert refused["text"] == (
        ":warning: I can't post in this channel: invite me with `/invite @finetune-bot`, then "
        "start again (Fine-tuning job 1 was cancelled; nothing ran)."
    )
    assert slack.ask("start lr=5e-6", channel="C0ARCHIVED")["text"] == (
        ":warning: This channel is archived, so I can't post in it (Fine-tuning job 2 was "
        "cancelled; nothing ran)."
    )
    assert [c.error for c in slack.standin.calls if c.method == "chat.postMessage"] == [
        "not_in_channel",
        "is_archived",
    ]
    jobs = _jobs(engine)
    assert [(j.status, j.thread_ts, j.cancel_requested) for j in jobs] == [
        (JobStatus.cancelled, None, True),
        (JobStatus.cancelled, None, True),
    ]
    assert jobs[0].error == (
        "its first message could not be posted in the channel (Slack: not_in_channel); nothing ran"
    )
    assert "(Slack: is_archived)" in jobs[1].error
    assert _claim(engine) is None  # no runner can claim them, now or later
    with new_session(engine) as session:
        kinds = [e.kind for e in session.exec(select(JobEvent).order_by(JobEvent.id))]
    assert kinds == ["queued", "cancelled", "queued", "cancelled"]


def test_per_user_limits_are_refused_with_the_numbers_approvers_included(slack, engine) -> None:
    news = ingest(slack, engine)
    for job_id in (1, 2, 3):  # USER_MAX_QUEUED_JOBS defaults to 3
        _start(slack, engine, job_id)
    assert slack.ask("start lr=5e-6")["text"] == (
        ":warning: you have 3 jobs queued, the limit is 3: cancel one or wait (`/finetune list`)"
    )
    assert len(_jobs(engine)) == 3  # nothing half-written

    assert _claim(engine).id == 1 and _claim(engine).id == 2  # two run, one waits
    assert slack.ask("start lr=5e-6")["text"] == (
        ":warning: you have 2 jobs running, the limit is 2: cancel one or wait for one to finish "
        "(`/finetune list`)"
    )
    with new_session(engine) as session:
        session.add(Checkpoint(job_id=1, step=5, path="c/5", base_model="tiny"))
        session.commit()
    assert "you have 2 jobs running, the limit is 2" in slack.ask("evaluate 1")["text"]

    _start(slack, engine, 4, user="U0OTHER")  # another user's room is their own
    for job_id in (5, 6, 7):
        _start(slack, engine, job_id, user=APPROVER)
    assert slack.ask("start lr=5e-6", user=APPROVER)["text"].startswith(
        ":warning: you have 3 jobs queued, the limit is 3"
    )
    assert (
        "you have 3 jobs queued, the limit is 3" in (slack.ask("export 1", user=APPROVER)["text"])
    )
    assert slack.ask("cancel 5", user=APPROVER)["text"] == "Job 5 cancelled."
    _start(slack, engine, 8, user=APPROVER)  # room again
    assert [j.dataset_id for j in _jobs(engine)] == [news.id] * 8


def test_evaluate_queues_an_evaluation_job_with_its_own_root_message(slack, engine) -> None:
    news = ingest(slack, engine)
    with new_session(engine) as session:
        trained = Job(
            base_model="tiny",
            dataset_id=news.id,
            status="failed",
            error="training finished and its checkpoint is kept, but the evaluation failed",
            requested_by="U0USER",
            channel_id="C0CHAN",
            thread_ts="1.0",
        )
        session.add(trained)
        session.flush()
        checkpoint = Checkpoint(
            job_id=trained.id, step=90, final=True, path="c/90", base_model="tiny"
        )
        session.add(checkpoint)
        session.commit()
    assert slack.ask("evaluate")["text"] == "Which checkpoint? `/finetune evaluate <checkpoint>`"
    assert slack.ask("evaluate 99")["text"] == ":warning: no checkpoint 99 in this channel"
    assert slack.ask(f"evaluate {checkpoint.id}", user="U0STRANGER")["text"] == (
        f":warning: only <@U0USER> (who started job {trained.id}) or an approver can evaluate "
        f"checkpoint {checkpoint.id}"
    )
    slack.command(f"evaluate {checkpoint.id}")  # the requester re-runs the failed evaluation
    [posted] = slack.standin.wait_for("chat.postMessage")
    assert posted["text"] == "Evaluation job 2 queued"
    header = posted["blocks"][0]["text"]["text"]
    assert "*Evaluation job 2* · queued" in header and "*news* v1" in header
    assert slack.wait_for_thread(engine, 2) == posted["_ts"]
    claimed = _claim(engine)  # its thread exists: a runner may take it
    assert (claimed.id, claimed.kind, claimed.config) == (
        2,
        "evaluate",
        {"checkpoint_id": checkpoint.id},
    )
    assert (claimed.dataset_id, claimed.base_model, claimed.requested_by) == (
        news.id,
        "tiny",
        "U0USER",
    )
    assert slack.ask(f"evaluate {checkpoint.id}", user=APPROVER)["text"] == (
        f":warning: checkpoint {checkpoint.id} is being evaluated already: evaluation job 2 is "
        "running"
    )
    assert slack.ask("cancel 2")["text"] == (
        "Job 2 asked to stop; the evaluation ends before its next phase, without a report."
    )
    assert len(_jobs(engine)) == 2
