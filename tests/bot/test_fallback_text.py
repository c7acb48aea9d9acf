"""Every message the bot sends with blocks carries a ``text`` that says the same in words: Slack's
notifications and screen readers read that, not the blocks. The main flows (a job from its start
to its report and a decision, a sweep to its best run, `/classify`, `/finetune status`) are driven
through signed requests and the notifier against the stand-in, which marks a message with blocks
and no text ``missing_text``; then every message is checked."""

from __future__ import annotations

import json
import re

import pytest
from sqlmodel import select

from bot.standin import block_action_body
from runner.sweep import after_run
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import add_job_event, record_progress
from storage.models import Checkpoint
from storage.sweeps import sweep_jobs
from tests.bot.conftest import APPROVER, deliver_all
from tests.bot.test_feedback import _checkpoint, serving  # noqa: F401 - a canned /v1/classify
from tests.bot.test_notifier import REPORT_TEXT, _queued_job, _run_a_job
from tests.bot.test_sweeps import _finish, _threaded_sweep

MESSAGES = ("chat.postMessage", "chat.update", "chat.postEphemeral", "response_url")
NUMBER = re.compile(r"\d+(?:\.\d+)?%?")


@pytest.fixture
def bot_extra_settings(serving) -> dict:  # noqa: F811
    return {"serving_url": f"http://127.0.0.1:{serving.server_address[1]}"}


def _with_blocks(slack) -> list[tuple[str, dict]]:
    with slack.standin._lock:
        calls = list(slack.standin.calls)
    return [(c.method, c.params) for c in calls if c.method in MESSAGES and c.params.get("blocks")]


def test_every_message_with_blocks_says_the_same_in_its_text(slack, engine, serving) -> None:  # noqa: F811
    # A job from its root to its report, and an approver's decision on it.
    job = _run_a_job(slack, engine)
    deliver_all(slack, engine)
    report = next(p for _, p in _with_blocks(slack) if p.get("text") == REPORT_TEXT)
    updated = len(slack.standin.calls_to("chat.update"))
    click = block_action_body(
        "reject_checkpoint",
        "1",
        user_id=APPROVER,
        message_ts=report["_ts"],
        blocks=report["blocks"],
        thread_ts=job.thread_ts,
    )
    assert slack.post(click).status_code == 200
    decided = slack.standin.wait_for("chat.update", updated + 1)[updated]
    assert decided["text"].startswith(":no_entry: Rejected by <@U0APPROVER>")
    status = slack.ask(f"status {job.id}")
    assert status["text"].startswith(f":white_check_mark: Fine-tuning job {job.id} · succeeded")

    # A job still training: its header in words.
    training = _queued_job(slack, engine)
    with new_session(engine) as session:
        progress = {"step": 3, "total_steps": 8, "epoch": 0.75, "loss": 2 / 3, "eta_s": 5}
        record_progress(session, job_id=training.id, token=training.lease_token, progress=progress)
    deliver_all(slack, engine)

    # A sweep to its best run.
    assert slack.command("sweep lr=1e-5,5e-5").status_code == 200
    found = _threaded_sweep(engine)
    store = ArtifactStore(slack.settings.artifact_dir)
    with new_session(engine) as session:
        runs = sweep_jobs(session, found.id)
        made = [Checkpoint(job_id=r.id, step=3, path=f"c/{r.id}", base_model="tiny") for r in runs]
        session.add_all(made)
        session.commit()
        checkpoints = [c.id for c in made]
    _finish(engine, store, {runs[0].id: (checkpoints[0], 0.4), runs[1].id: (checkpoints[1], 0.8)})
    with new_session(engine) as session:
        for run, checkpoint in zip(runs, checkpoints, strict=True):
            add_job_event(session, job_id=run.id, kind="evaluated", checkpoint_id=checkpoint)
        session.commit()
        assert after_run(session, store, sweep_id=found.id)
    deliver_all(slack, engine)

    # `/classify`'s answer.
    serving.checkpoint_id = _checkpoint(slack, engine, "C0CHAN")
    before = len(slack.standin.calls_to("response_url"))
    assert slack.command("球队夺冠", command="/classify").status_code == 200
    answer = slack.reply(before)
    assert answer["text"] == "体育 · 62%" and answer["blocks"]

    assert slack.standin.warned() == []  # Slack would have taken them all without a warning
    sent = _with_blocks(slack)
    kinds = {
        "root": [p for m, p in sent if m == "chat.postMessage" and "thread_ts" not in p],
        "header": [p for m, p in sent if m == "chat.update" and p["ts"] == job.thread_ts],
        "sweep": [p for m, p in sent if m == "chat.update" and p["ts"] == found.thread_ts],
        "answer": [p for m, p in sent if m == "response_url"],
    }
    assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}
    assert kinds["header"][-1]["text"] == f"Fine-tuning job {job.id}: succeeded"
    running = [p for p in sent if p[0] == "chat.update" and p[1]["ts"] == training.thread_ts]
    assert running[-1][1]["text"] == (
        f"Fine-tuning job {training.id}: running, step 3/8, loss 0.6667, about 5s left"
    )
    assert kinds["sweep"][-1]["text"].startswith(
        f"Sweep {found.id}: finished, best run job {runs[1].id}"
    )
    for method, params in sent:
        text = params.get("text") or ""
        assert len(text.split()) >= 2, (method, text)  # words, not an emoji or a label alone
        shown = json.dumps(params["blocks"], ensure_ascii=False)
        for number in NUMBER.findall(text):  # and nothing the blocks do not say
            assert number in shown, (method, number, text)
    with new_session(engine) as session:  # the flows went through: nothing was refused
        assert session.exec(select(Checkpoint).where(Checkpoint.status == "rejected")).one()


def test_the_stand_in_marks_blocks_without_text_as_slack_warns_of_them(slack) -> None:
    import warnings

    from slack_sdk import WebClient

    client = WebClient(token=slack.standin.bot_token, base_url=slack.settings.slack_api_url)
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*hello*"}}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # slack_sdk's own warning of the same
        assert client.chat_postMessage(channel="C0CHAN", blocks=blocks)["ok"]  # Slack takes it
        client.chat_postMessage(channel="C0CHAN", blocks=blocks, text="hello")
    [warned] = slack.standin.warned()
    assert warned.method == "chat.postMessage" and warned.warning == "missing_text"
