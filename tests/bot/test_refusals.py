"""Errors and refusals are told to the user who acted, privately: a command's answer through its
response_url as ``ephemeral``, a click's (or an event's) through ``chat.postEphemeral`` to that
user; never a message in the channel. Driven through signed requests against the stand-in."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlmodel import select

from bot.standin import block_action_body, event_body, slash_command_body
from core.enums import CheckpointStatus
from storage.db import new_session
from storage.models import Checkpoint, Job
from tests.bot.conftest import APPROVER, ingest

CHANNEL = "C0CHAN"
USER, STRANGER = "U0USER", "U0STRANGER"


@pytest.fixture
def bot_extra_settings() -> dict:
    with socket.socket() as s:  # a port nothing listens on: serving is down
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    return {"serving_url": f"http://127.0.0.1:{closed}", "max_upload_bytes": 1000}


def _until(found: Callable[[], list[dict]], what: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if hits := found():
            assert len(hits) == 1, hits
            return hits[0]
        time.sleep(0.02)
    raise AssertionError(f"never answered: {what}")


class Actor:
    """Commands and clicks of one user, each answer found by whose it is."""

    def __init__(self, slack, user: str) -> None:
        self.slack, self.user, self.asked = slack, user, 0

    def command(self, text: str, command: str = "/finetune") -> dict:
        """The command's answer: what the bot posted to this command's own response_url."""
        self.asked += 1
        name = f"{self.user}-{self.asked}"
        body = slash_command_body(
            command,
            text,
            user_id=self.user,
            channel_id=CHANNEL,
            response_url=self.slack.standin.response_url(name),
        )
        assert self.slack.post(body).status_code == 200
        return _until(
            lambda: [
                c for c in self.slack.standin.calls_to("response_url") if c["_response_url"] == name
            ],
            f"{command} {text}",
        )

    def _ephemeral_after(self, post: Callable[[], None], what: str) -> dict:
        before = len(self._ephemerals())
        post()
        return _until(lambda: self._ephemerals()[before:], what)

    def _ephemerals(self) -> list[dict]:
        return [
            c for c in self.slack.standin.calls_to("chat.postEphemeral") if c["user"] == self.user
        ]

    def click(self, action: str, value: str) -> dict:
        """The answer to a button click in the channel, told to this user alone."""

        def post() -> None:
            body = block_action_body(action, value, user_id=self.user, channel_id=CHANNEL)
            assert self.slack.post(body).status_code == 200

        return self._ephemeral_after(post, f"{action} {value}")

    def share(self, file_id: str) -> dict:
        def post() -> None:
            event = {
                "type": "file_shared",
                "file_id": file_id,
                "user_id": self.user,
                "channel_id": CHANNEL,
                "event_ts": "1.0",
            }
            body = event_body(event, event_id=f"Ev{file_id}")
            assert self.slack.post(body, content_type="application/json").status_code == 200

        return self._ephemeral_after(post, f"share {file_id}")


def _private(answer: dict) -> str:
    """A response_url answer's text, checked to be ephemeral (Slack's default for one)."""
    assert answer.get("response_type", "ephemeral") == "ephemeral", answer
    assert answer.get("replace_original") in (None, False)
    return answer["text"]


def _channel_messages(slack) -> list[dict]:
    """What everyone in the channel sees: messages posted or edited there, in channel answers."""
    with slack.standin._lock:
        calls = list(slack.standin.calls)
    return [
        {"method": c.method, **c.params}
        for c in calls
        if c.accepted
        and (
            (c.method in ("chat.postMessage", "chat.update") and c.params.get("channel") == CHANNEL)
            or (c.method == "response_url" and c.params.get("response_type") == "in_channel")
        )
    ]


def test_every_refusal_is_told_to_the_user_who_acted_and_nothing_to_the_channel(
    slack, engine
) -> None:
    ingest(slack, engine, channel=CHANNEL)
    user, stranger, approver = Actor(slack, USER), Actor(slack, STRANGER), Actor(slack, APPROVER)
    sweep = slash_command_body("/finetune", "sweep lr=1e-5,5e-5", user_id=USER, channel_id=CHANNEL)
    assert slack.post(sweep).status_code == 200  # its root is the one message the channel gets
    [root] = slack.standin.wait_for("chat.postMessage")
    with new_session(engine) as session:
        run = session.get(Job, 1)
        promoted = Checkpoint(job_id=run.id, step=1, path="c/1", base_model="tiny")
        promoted.status, promoted.decided_by = CheckpointStatus.promoted.value, APPROVER
        session.add(promoted)
        session.commit()
        promoted_id = promoted.id

    # Slash commands: bad input, refused, not found, serving down, Slack refusing the root.
    assert "Unknown subcommand `frobnicate`" in _private(user.command("frobnicate"))
    assert "learning_rate" in _private(user.command("start lr=abc"))
    assert "unknown setting" in _private(user.command("start colour=blue"))
    assert "only approvers can promote" in _private(stranger.command(f"promote {promoted_id}"))
    assert "only approvers can roll back" in _private(stranger.command("rollback"))
    assert "no job 99 in this channel" in _private(user.command("cancel 99"))
    assert "only <@U0USER> (who started sweep 1)" in _private(stranger.command("sweep cancel 1"))
    assert "only approvers can look in every channel" in _private(stranger.command("list all"))
    assert "What should I classify?" in _private(user.command("", command="/classify"))
    assert "unreachable" in _private(user.command("球队夺冠", command="/classify"))
    slack.standin.inject("chat.postMessage", error="not_in_channel")
    assert "/invite @finetune-bot" in _private(user.command("start lr=5e-6"))

    # Buttons: a stranger's click, a stale one, one naming nothing.
    refused = stranger.click("approve_checkpoint", str(promoted_id))
    assert refused["channel"] == CHANNEL and "Only approvers" in refused["text"]
    assert "Only approvers" in stranger.click("reject_checkpoint", str(promoted_id))["text"]
    assert (
        "already promoted by <@U0APPROVER>"
        in (approver.click("approve_checkpoint", str(promoted_id))["text"])
    )
    assert "Checkpoint 999 no longer exists" in approver.click("approve_checkpoint", "999")["text"]
    assert "names no checkpoint" in approver.click("approve_checkpoint", "garbage")["text"]
    assert "or an approver can cancel it" in stranger.click("cancel_sweep", "1")["text"]
    rollback = '{"to": "base", "expected_current": 7}'
    assert "Only approvers can roll back" in stranger.click("confirm_rollback", rollback)["text"]
    assert "does not say what to roll back" in approver.click("confirm_rollback", "{}")["text"]
    assert "does not name an evaluation" in user.click("show_mistakes", "nonsense")["text"]
    assert "nothing was recorded" in user.click("confirm_label", "{}")["text"]

    # A file shared in the channel that the bot refuses: told to who shared it.
    slack.standin.add_file("F0BIG", "train.json", b"[" + b" " * 2000 + b"]")
    assert "over the upload limit" in user.share("F0BIG")["text"]

    messages = _channel_messages(slack)
    assert [(m["method"], m.get("ts")) for m in messages] == [("chat.postMessage", None)]
    assert messages[0]["_ts"] == root["_ts"]
    with new_session(engine) as session:  # and nothing was changed by any of it
        assert session.get(Checkpoint, promoted_id).status == CheckpointStatus.promoted
        assert {j.status for j in session.exec(select(Job)).all()} <= {"queued", "cancelled"}


class _OddServing(BaseHTTPRequestHandler):
    """A serving that answers `/v1/classify` with something no bot can show."""

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = b'["not", "an", "answer"]'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_an_answer_the_bot_cannot_show_is_an_error_id_told_to_the_asker(
    slack, engine, caplog
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OddServing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # The bot under test reads this Settings object (this test's own bot): point it there.
        slack.settings.serving_url = f"http://127.0.0.1:{server.server_address[1]}"
        text = _private(Actor(slack, USER).command("球队夺冠", command="/classify"))
    finally:
        server.shutdown()
    [error_id] = re.findall(r"error id `(\w+)`", text)
    assert f"/classify failed (error id {error_id})" in caplog.text
    assert _channel_messages(slack) == []
