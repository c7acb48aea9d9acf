"""The bot's Slack side: Socket Mode starts without a signing secret (its requests are not
signed) and HTTP mode still refuses to; the listeners' client waits out a 429 and retries."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import pytest
from slack_bolt.adapter.socket_mode.internals import run_bolt_app
from slack_bolt.request import BoltRequest
from slack_sdk.socket_mode.request import SocketModeRequest

from bot.app import create_app
from bot.standin import SlackStandIn, slash_command_body
from core.errors import ConfigError
from core.settings import Settings
from storage.db import new_session
from storage.models import Job
from tests.bot.test_commands import _dataset


@pytest.fixture
def standin() -> Iterator[SlackStandIn]:
    standin = SlackStandIn()
    standin.start()
    yield standin
    standin.stop()


def _settings(settings: Settings, standin: SlackStandIn, **slack: str | None) -> Settings:
    return Settings(
        _env_file=None,
        database_url=settings.database_url,
        artifact_dir=settings.artifact_dir,
        slack_bot_token=standin.bot_token,
        slack_api_url=standin.api_url,
        **slack,
    )


def test_socket_mode_starts_and_answers_without_a_signing_secret(
    engine, settings, standin, monkeypatch
) -> None:
    monkeypatch.delenv("SLACK_SIGNING_SECRET", raising=False)
    configured = _settings(settings, standin, slack_app_token="xapp-1-A0APP-1-socket")
    assert configured.slack_signing_secret is None
    app = create_app(configured, socket_mode=True)
    body = slash_command_body("/finetune", "help", response_url=standin.response_url())
    payload = {key: values[0] for key, values in urllib.parse.parse_qs(body).items()}
    # What bolt's SocketModeHandler does with each envelope from the websocket:
    answer = run_bolt_app(app, SocketModeRequest("slash_commands", "envelope-1", payload))
    assert answer.status == 200
    reply = standin.wait_for("response_url")[0]
    assert reply["response_type"] == "ephemeral" and "`/finetune start" in reply["text"]
    # The same app never takes an HTTP request unverified: it has no secret to check it with.
    unsigned = app.dispatch(
        BoltRequest(body=body, headers={"content-type": "application/x-www-form-urlencoded"})
    )
    assert unsigned.status != 200
    assert len(standin.calls_to("response_url")) == 1


def test_http_mode_still_needs_the_signing_secret(settings, standin, monkeypatch) -> None:
    monkeypatch.delenv("SLACK_SIGNING_SECRET", raising=False)
    configured = _settings(settings, standin, slack_app_token="xapp-1-A0APP-1-socket")
    with pytest.raises(ConfigError) as refused:
        create_app(configured)  # --http, or no SLACK_APP_TOKEN
    assert "HTTP mode needs SLACK_SIGNING_SECRET" in refused.value.message
    blank = _settings(settings, standin, slack_signing_secret="")  # as .env.example ships it
    with pytest.raises(ConfigError) as refused:
        create_app(blank)
    assert "HTTP mode needs SLACK_SIGNING_SECRET" in refused.value.message
    with pytest.raises(ConfigError) as refused:
        create_app(_settings(settings, standin), socket_mode=True)
    assert "Socket Mode needs SLACK_APP_TOKEN" in refused.value.message


def test_a_command_answers_through_a_429(slack, engine) -> None:
    _dataset(slack, engine)
    slack.standin.inject("chat.postMessage", status=429, retry_after=1, channel="C0CHAN")
    slack.command("start lr=5e-6")
    thread = slack.wait_for_thread(engine, 1)  # the root message went out after Retry-After
    posts = slack.standin.calls_to("chat.postMessage")
    assert len(posts) == 2 and posts[1]["_ts"] == thread
    assert [c.status for c in slack.standin.calls if c.method == "chat.postMessage"] == [429, 200]
    with new_session(engine) as session:
        assert session.get(Job, 1).thread_ts == thread


def test_a_command_answers_through_a_reset_connection(slack, engine) -> None:
    _dataset(slack, engine)
    slack.standin.inject("chat.postMessage", reset=True, channel="C0CHAN")
    slack.command("start lr=5e-6")
    thread = slack.wait_for_thread(engine, 1)
    assert [c.status for c in slack.standin.calls if c.method == "chat.postMessage"] == [0, 200]
    assert slack.standin.calls_to("chat.postMessage", accepted_only=True)[0]["_ts"] == thread
