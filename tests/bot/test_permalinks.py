"""Links between the App Home, job threads and reports: the stand-in's ``chat.getPermalink`` answers
as Slack does (the link, a thread reply's link, ``message_not_found``, ``channel_not_found``); the
bot asks once per message; the home's rows link to their threads and reports, and show no link
where Slack gives none; a finished sweep's reply links to its best run's report."""

from __future__ import annotations

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from sqlmodel import col, select

from bot.permalinks import REPORT_TS, Permalinks
from runner.sweep import after_run
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import add_job_event
from storage.models import Checkpoint, JobEvent
from storage.sweeps import sweep_jobs
from tests.bot.conftest import deliver_all, ingest
from tests.bot.test_home import _home
from tests.bot.test_notifier import REPORT_TEXT, _queued_job, _run_a_job
from tests.bot.test_sweeps import _finish, _threaded_sweep

CHANNEL = "C0CHAN"


def _client(slack) -> WebClient:
    return WebClient(token=slack.standin.bot_token, base_url=slack.settings.slack_api_url)


def _link(channel: str, ts: str, thread: str | None = None) -> str:
    link = f"https://standin.slack.com/archives/{channel}/p{ts.replace('.', '')}"
    return link + (f"?thread_ts={thread}&cid={channel}" if thread else "")


def _asked(slack) -> list[str]:
    return [p["message_ts"] for p in slack.standin.calls_to("chat.getPermalink")]


def test_the_stand_in_answers_get_permalink_as_slack_does(slack) -> None:
    client = _client(slack)
    root = client.chat_postMessage(channel=CHANNEL, text="root")["ts"]
    reply = client.chat_postMessage(channel=CHANNEL, text="reply", thread_ts=root)["ts"]
    answer = client.chat_getPermalink(channel=CHANNEL, message_ts=root)
    assert answer.data == {"ok": True, "channel": CHANNEL, "permalink": _link(CHANNEL, root)}
    in_thread = client.chat_getPermalink(channel=CHANNEL, message_ts=reply)["permalink"]
    assert in_thread == _link(CHANNEL, reply, thread=root)

    slack.standin.delete_message(CHANNEL, root)
    for channel, ts, code in [
        (CHANNEL, root, "message_not_found"),  # deleted
        (CHANNEL, "1.000001", "message_not_found"),  # never posted
        ("C0NOWHERE", reply, "channel_not_found"),
    ]:
        with pytest.raises(SlackApiError) as refused:
            client.chat_getPermalink(channel=channel, message_ts=ts)
        assert refused.value.response["error"] == code


def test_each_message_is_asked_once_and_only_lasting_failures_are_remembered(slack) -> None:
    client, links = _client(slack), Permalinks()
    root = client.chat_postMessage(channel=CHANNEL, text="root")["ts"]
    assert links.link(client, CHANNEL, root) == links.link(client, CHANNEL, root)
    assert links.link(client, CHANNEL, root) == _link(CHANNEL, root)
    assert _asked(slack) == [root]

    assert links.link(client, CHANNEL, "1.000001") is None  # message_not_found: remembered
    assert links.link(client, CHANNEL, "1.000001") is None
    assert _asked(slack) == [root, "1.000001"]

    other = client.chat_postMessage(channel=CHANNEL, text="other")["ts"]
    slack.standin.inject("chat.getPermalink", error="internal_error")
    assert links.link(client, CHANNEL, other) is None  # Slack trouble: asked again next time
    assert links.link(client, CHANNEL, other) == _link(CHANNEL, other)
    assert links.link(client, None, other) is None and links.link(client, CHANNEL, None) is None
    assert _asked(slack) == [root, "1.000001", other, other]


def _report_ts(engine, job_id: int) -> str:
    with new_session(engine) as session:
        event = session.exec(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "evaluated")
        ).one()
    return str(event.payload[REPORT_TS])


def _row(view: dict, words: str) -> str:
    [text] = [
        b["text"]["text"] for b in view["blocks"] if b["type"] == "section" and words in str(b)
    ]
    return text


def test_the_home_links_jobs_to_their_threads_and_checkpoints_to_their_reports(
    slack, engine
) -> None:
    done = _run_a_job(slack, engine)  # its checkpoint 1 has a report in its thread
    deliver_all(slack, engine)
    report = _report_ts(engine, done.id)
    [posted] = [
        p for p in slack.standin.calls_to("chat.postMessage") if p.get("text") == REPORT_TEXT
    ]
    assert posted["_ts"] == report and posted["thread_ts"] == done.thread_ts
    running = _queued_job(slack, engine)  # claimed: running, in the home's first list
    gone = _queued_job(slack, engine)
    slack.standin.delete_message(CHANNEL, gone.thread_ts)  # someone deleted its root message

    view = _home(slack, "U0USER")
    board = _row(view, "*checkpoint 1*")
    assert f"<{_link(CHANNEL, report, thread=done.thread_ts)}|report>" in board
    row = _row(view, f"*Fine-tuning job {running.id}*")
    assert row.endswith(f"in <#{CHANNEL}> · <{_link(CHANNEL, running.thread_ts)}|thread>")
    row = _row(view, f"*Fine-tuning job {gone.id}*")  # message_not_found: shown, without a link
    assert row.endswith(f"in <#{CHANNEL}>") and "slack.com" not in row
    assert sorted(_asked(slack)) == sorted([report, running.thread_ts, gone.thread_ts])

    again = _home(slack, "U0USER")  # the links are cached: Slack is not asked again
    assert _row(again, "*checkpoint 1*") == board
    assert len(_asked(slack)) == 3


def test_a_home_is_published_when_slack_gives_no_links_at_all(slack, engine) -> None:
    job = _queued_job(slack, engine)
    slack.standin.inject("chat.getPermalink", status=500, times=5)
    row = _row(_home(slack, "U0USER"), f"*Fine-tuning job {job.id}*")
    assert row.endswith(f"in <#{CHANNEL}>")


def test_a_finished_sweeps_reply_links_to_its_best_runs_report(slack, engine) -> None:
    ingest(slack, engine)
    assert slack.command("sweep lr=1e-5,5e-5").status_code == 200
    [root] = slack.standin.wait_for("chat.postMessage")
    found = _threaded_sweep(engine)
    store = ArtifactStore(slack.settings.artifact_dir)
    with new_session(engine) as session:
        first, second = sweep_jobs(session, found.id)
        made = [
            Checkpoint(job_id=j.id, step=3, path=f"c/{j.id}", base_model="tiny")
            for j in (first, second)
        ]
        session.add_all(made)
        session.commit()
        meh, good = (c.id for c in made)
    _finish(engine, store, {first.id: (meh, 0.4), second.id: (good, 0.8)})
    with new_session(engine) as session:
        for job_id, checkpoint in ((first.id, meh), (second.id, good)):
            add_job_event(session, job_id=job_id, kind="evaluated", checkpoint_id=checkpoint)
        session.commit()
        assert after_run(session, store, sweep_id=found.id)
    deliver_all(slack, engine)
    report = _report_ts(engine, second.id)
    [reply] = [
        p["text"]
        for p in slack.standin.calls_to("chat.postMessage", accepted_only=True)
        if "finished: the best run" in (p.get("text") or "")
    ]
    link = _link(CHANNEL, report, thread=root["_ts"])
    assert f"is job {second.id} (checkpoint {good}, <{link}|its report>)" in reply
    with new_session(engine) as session:  # every event delivered, none given up
        events = session.exec(select(JobEvent).where(col(JobEvent.delivered_at).is_(None))).all()
    assert events == []
