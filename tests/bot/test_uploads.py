"""Datasets shared as Slack files: only dataset-like files are fetched (with the bot token), the bot
queues a dataset check and parses nothing itself, a runner validates and stores the file, and the
report reaches the check's thread through the outbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from slack_sdk import WebClient
from sqlmodel import select

from bot.notifier import Notifier
from bot.standin import event_body, view_submission_body
from core.enums import JobKind, JobStatus
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import claim_next_job
from storage.models import Dataset, Job
from tests.bot.conftest import run_queued
from tests.runner import dataset_files as files


@pytest.fixture
def bot_extra_settings(tiny_model_dir: Path) -> dict:
    return {"base_model": str(tiny_model_dir)}


def _share(slack, file_id: str, event_id: str, channel: str = "C0CHAN") -> None:
    event = {
        "type": "file_shared",
        "file_id": file_id,
        "user_id": "U0USER",
        "channel_id": channel,
        "event_ts": "1.0",
    }
    response = slack.post(event_body(event, event_id=event_id), content_type="application/json")
    assert response.status_code == 200


def _datasets(engine) -> list[Dataset]:
    with new_session(engine) as session:
        return list(session.exec(select(Dataset)).all())


def _checks(engine) -> list[Job]:
    with new_session(engine) as session:
        return list(session.exec(select(Job).where(Job.kind == JobKind.ingest.value)).all())


def _run_checks(slack, engine) -> list[Job]:
    return run_queued(slack, engine, JobKind.ingest)


def _deliver(slack, engine) -> None:
    client = WebClient(token=slack.standin.bot_token, base_url=slack.settings.slack_api_url)
    notifier = Notifier(
        engine, client, ArtifactStore(slack.settings.artifact_dir), channel_interval=0.0
    )
    try:
        notifier.deliver_pending()
    finally:
        notifier.close()


def _thread(slack, ts: str) -> list[str]:
    return [
        p.get("text") or ""
        for p in slack.standin.calls_to("chat.postMessage", accepted_only=True)
        if p.get("thread_ts") == ts
    ]


def test_the_tutorial_zip_is_checked_by_a_runner_and_reported_in_its_thread(
    slack, engine, tmp_path
) -> None:
    archive = files.tutorial_zip(tmp_path / "data_news_300.zip")
    slack.standin.add_file("F0ZIP", "data_news_300.zip", archive.read_bytes())
    _share(slack, "F0ZIP", "Ev001")
    [root] = slack.standin.wait_for("chat.postMessage")
    assert root["text"] == ":mag: Dataset check 1: checking `data_news_300.zip`…"
    thread = slack.wait_for_thread(engine, 1)
    [download] = slack.standin.calls_to("file_download")
    assert download["_token"] == slack.standin.bot_token
    [check] = _checks(engine)
    assert check.status == JobStatus.queued and check.thread_ts == thread
    assert _datasets(engine) == []  # the bot stored the file, it parsed nothing
    upload = ArtifactStore(slack.settings.artifact_dir).path(check.config["upload"])
    assert (upload / "data_news_300.zip").read_bytes() == archive.read_bytes()

    _share(slack, "F0ZIP", "Ev001")  # Slack retries the same event: handled once
    assert len(_checks(engine)) == 1

    [done] = _run_checks(slack, engine)
    assert done.status == JobStatus.succeeded, done.error
    [dataset] = _datasets(engine)
    assert (dataset.name, dataset.channel_id, dataset.uploaded_by) == (
        "data_news_300",
        "C0CHAN",
        "U0USER",
    )
    assert not upload.exists()  # the raw upload is gone once stored
    _deliver(slack, engine)
    stored, report = _thread(slack, thread)
    assert stored.startswith(
        ":inbox_tray: Dataset *data_news_300* v1 stored from "
        "`data_news_300.zip`: 300 train, 100 eval, 10 labels"
    )
    assert "train: 300 samples, 300 with <think>" in report
    header = slack.standin.calls_to("chat.update")[-1]
    assert header["ts"] == thread and "Dataset check 1" in header["text"]


def test_files_that_are_not_datasets_are_left_alone(slack, engine) -> None:
    slack.standin.add_file("F0PNG", "screenshot.png", b"\x89PNG not a dataset")
    slack.standin.add_file("F0TXT", "notes.txt", b"meeting notes")
    _share(slack, "F0PNG", "Ev010")
    _share(slack, "F0TXT", "Ev011")
    slack.standin.wait_for("files.info", 2)
    assert slack.standin.calls_to("file_download") == []  # never fetched
    assert slack.standin.calls_to("chat.postMessage") == []  # nothing said in the channel
    assert _checks(engine) == []


def test_an_html_login_page_instead_of_the_file_is_an_error(slack, engine) -> None:
    slack.standin.add_file("F0HTML", "train.json", b"[]", html_login_page=True)
    _share(slack, "F0HTML", "Ev002")
    [message] = slack.standin.wait_for("chat.postEphemeral")  # told to who shared it alone
    assert message["user"] == "U0USER" and message["channel"] == "C0CHAN"
    assert "Slack sent a login page instead of train.json" in message["text"]
    assert "files:read" in message["text"]
    assert slack.standin.calls_to("chat.postMessage") == []  # nothing said in the channel
    assert _checks(engine) == [] and _datasets(engine) == []
    assert not (Path(slack.settings.artifact_dir) / "uploads").exists()


def test_a_rejected_file_says_why_in_its_thread_and_stores_nothing(slack, engine) -> None:
    bad = json.dumps([{"conversations": [{"from": "gpt", "value": "体育"}]}]).encode()
    slack.standin.add_file("F0BAD", "train.json", bad)
    _share(slack, "F0BAD", "Ev003")
    slack.standin.wait_for("chat.postMessage")
    thread = slack.wait_for_thread(engine, 1)
    [done] = _run_checks(slack, engine)
    assert done.status == JobStatus.failed and "record 0" in done.error
    assert _datasets(engine) == []
    _deliver(slack, engine)
    [message] = _thread(slack, thread)
    assert message.startswith(":x: `train.json` was rejected; nothing was stored.")
    assert "record 0" in message and "roles out of order" in message


def test_the_start_form_with_a_file_trains_on_it_once_it_is_stored(slack, engine, tmp_path):
    archive = files.tutorial_zip(tmp_path / "data_news_300.zip")
    slack.standin.add_file("F0FORM", "data_news_300.zip", archive.read_bytes())
    values = {
        "dataset_file": {"value": {"files": [{"id": "F0FORM"}]}},
        "cfg_learning_rate": {"value": {"value": "5e-6"}},
    }
    response = slack.post(
        view_submission_body(
            "start_job", values, private_metadata=json.dumps({"channel_id": "C0CHAN"})
        )
    )
    assert response.status_code == 200
    slack.standin.wait_for("chat.postMessage")
    slack.wait_for_thread(engine, 1)
    [done] = _run_checks(slack, engine)
    assert done.status == JobStatus.succeeded, done.error
    with new_session(engine) as session:
        [training] = session.exec(select(Job).where(Job.kind == JobKind.train.value)).all()
    assert training.config == {"learning_rate": 5e-6} and training.thread_ts is None
    with new_session(engine) as session:  # no thread yet: no runner may take it
        assert claim_next_job(session, owner="r", lease_seconds=60) is None
    _deliver(slack, engine)
    root = next(
        p
        for p in slack.standin.calls_to("chat.postMessage", accepted_only=True)
        if p.get("text") == f"Fine-tuning job {training.id} queued"
    )
    assert "thread_ts" not in root  # its own message in the channel, its own thread
    with new_session(engine) as session:
        claimed = claim_next_job(session, owner="r", lease_seconds=60)
    assert claimed is not None and claimed.id == training.id and claimed.thread_ts == root["_ts"]
    assert "Fine-tuning job 2 is queued on it" in _thread(slack, done.thread_ts)[0]
