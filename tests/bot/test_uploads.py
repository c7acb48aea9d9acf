"""Datasets shared as Slack files: fetched with the bot token, ingested, reported in a thread."""

from __future__ import annotations

import json

from sqlmodel import select

from bot.standin import event_body
from storage.db import new_session
from storage.models import Dataset
from tests.runner import dataset_files as files


def _share(slack, file_id: str, event_id: str) -> None:
    event = {
        "type": "file_shared",
        "file_id": file_id,
        "user_id": "U0USER",
        "channel_id": "C0CHAN",
        "event_ts": "1.0",
    }
    response = slack.post(event_body(event, event_id=event_id), content_type="application/json")
    assert response.status_code == 200


def _datasets(engine) -> list[Dataset]:
    with new_session(engine) as session:
        return list(session.exec(select(Dataset)).all())


def test_the_tutorial_zip_shared_in_a_channel_is_ingested_and_reported(
    slack,
    engine,
    tmp_path,
) -> None:
    archive = files.tutorial_zip(tmp_path / "data_news_300.zip")
    slack.standin.add_file("F0ZIP", "data_news_300.zip", archive.read_bytes())
    _share(slack, "F0ZIP", "Ev001")
    root, report = slack.standin.wait_for("chat.postMessage", 2)
    assert root["text"].startswith(
        ":inbox_tray: Dataset *data_news_300* v1 stored from "
        "`data_news_300.zip`: 300 train, 100 eval, 10 labels"
    )
    assert report["thread_ts"] and "train: 300 samples, 300 with <think>" in report["text"]
    [download] = slack.standin.calls_to("file_download")
    assert download["_token"] == slack.standin.bot_token
    [dataset] = _datasets(engine)
    assert (dataset.channel_id, dataset.uploaded_by) == ("C0CHAN", "U0USER")

    _share(slack, "F0ZIP", "Ev001")  # Slack retries the same event: handled once
    slack.command("datasets")
    slack.reply(0)
    assert len(_datasets(engine)) == 1
    assert len(slack.standin.calls_to("chat.postMessage")) == 2


def test_an_html_login_page_instead_of_the_file_is_an_error(slack, engine) -> None:
    slack.standin.add_file("F0HTML", "train.json", b"[]", html_login_page=True)
    _share(slack, "F0HTML", "Ev002")
    [message] = slack.standin.wait_for("chat.postMessage")
    assert "Slack sent a login page instead of train.json" in message["text"]
    assert "files:read" in message["text"] and _datasets(engine) == []


def test_a_rejected_file_says_why_and_stores_nothing(slack, engine) -> None:
    bad = json.dumps([{"conversations": [{"from": "gpt", "value": "体育"}]}]).encode()
    slack.standin.add_file("F0BAD", "train.json", bad)
    _share(slack, "F0BAD", "Ev003")
    [message] = slack.standin.wait_for("chat.postMessage")
    assert message["text"].startswith(":x: `train.json` was rejected; nothing was stored.")
    assert "record 0" in message["text"] and "roles out of order" in message["text"]
    assert _datasets(engine) == []
