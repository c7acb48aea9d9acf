"""The bot for real over HTTP: its Starlette app under uvicorn on loopback, talking to the Slack
Web API stand-in, driven by correctly signed requests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from bot.app import create_http_app
from bot.home import HomeViewers
from bot.standin import SlackStandIn, signed_headers, slash_command_body
from core.settings import Settings

SECRET = "test-signing-secret-0123456789"
APPROVER = "U0APPROVER"
GROUP_MEMBER = "U0GROUPIE"


@dataclass
class SlackWorld:
    standin: SlackStandIn
    url: str
    settings: Settings
    home_viewers: HomeViewers  # who opened their App Home in the bot under test

    def post(
        self,
        body: str,
        *,
        timestamp: int | None = None,
        secret: str = SECRET,
        content_type: str = "application/x-www-form-urlencoded",
    ) -> httpx.Response:
        headers = signed_headers(secret, body, timestamp=timestamp, content_type=content_type)
        return httpx.post(f"{self.url}/slack/events", content=body, headers=headers, timeout=10)

    def command(
        self,
        text: str,
        *,
        user: str = "U0USER",
        channel: str = "C0CHAN",
        command: str = "/finetune",
    ) -> httpx.Response:
        body = slash_command_body(
            command,
            text,
            user_id=user,
            channel_id=channel,
            response_url=self.standin.response_url(f"{len(text)}"),
        )
        return self.post(body)

    def wait_for_thread(self, engine, job_id: int) -> str:
        """The job's root-message ts, once the bot has committed it."""
        from storage.db import new_session
        from storage.models import Job

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with new_session(engine) as session:
                job = session.get(Job, job_id)
                if job is not None and job.thread_ts:
                    return job.thread_ts
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} never got its thread")

    def reply(self, before: int) -> dict:
        """The next response_url message after the first ``before`` ones."""
        return self.standin.wait_for("response_url", before + 1)[before]

    def ask(self, text: str, **kwargs) -> dict:
        """A /finetune command and its answer (through response_url)."""
        before = len(self.standin.calls_to("response_url"))
        assert self.command(text, **kwargs).status_code == 200
        return self.reply(before)


def ingest(
    slack: SlackWorld,
    engine,
    *,
    channel: str | None = "C0CHAN",
    name: str = "news",
    user: str | None = "U0USER",
    source=None,
):
    """The demo dataset (or the folder ``source``) stored as an upload of ``channel`` (None: the
    deployment's, as ``python -m runner ingest`` stores it) through the ingestion code uploads
    use."""
    from runner.datasets.ingest import IngestOptions, ingest_dataset
    from storage.artifacts import ArtifactStore
    from storage.db import new_session
    from tests.conftest import DEMO_DATASET

    with new_session(engine) as session:
        dataset, _ = ingest_dataset(
            session,
            ArtifactStore(slack.settings.artifact_dir),
            source or DEMO_DATASET,
            IngestOptions.from_settings(slack.settings),
            name=name,
            tokenizer=None,
            channel_id=channel,
            uploaded_by=user,
        )
    return dataset


def run_queued(slack: SlackWorld, engine, kind) -> list:
    """What a runner's slot for ``kind`` does, with the runner's own code: claim each queued job
    of that kind and run it; the jobs as they ended."""
    from runner.job import run_job
    from storage.db import new_session
    from storage.jobs import claim_next_job
    from storage.models import Job

    ran = []
    with new_session(engine) as session:
        while job := claim_next_job(session, owner="r", lease_seconds=60, kinds=[kind]):
            run_job(job.id, job.lease_token, slack.settings)
            ran.append(job.id)
    with new_session(engine) as session:
        return [session.get(Job, job_id) for job_id in ran]


def send_json(handler, payload: dict, status: int = 200) -> None:
    """Answer a stand-in HTTP server's request (a ``BaseHTTPRequestHandler``) with JSON."""
    import json

    body = json.dumps(payload, ensure_ascii=False).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def bot_extra_settings() -> dict:
    """Extra settings for the bot under test (a test module overrides this fixture)."""
    return {}


@pytest.fixture
def slack(engine, settings: Settings, bot_extra_settings: dict) -> Iterator[SlackWorld]:
    standin = SlackStandIn(usergroups={"S0APPROVERS": [GROUP_MEMBER]})
    api_url = standin.start()
    configured = Settings(
        _env_file=None,
        database_url=settings.database_url,
        artifact_dir=settings.artifact_dir,
        slack_bot_token=standin.bot_token,
        slack_signing_secret=SECRET,
        slack_api_url=api_url,
        approvers=[APPROVER, "S0APPROVERS"],
        **bot_extra_settings,
    )
    port = _free_port()
    viewers = HomeViewers()
    server = uvicorn.Server(
        uvicorn.Config(
            create_http_app(configured, notifier=False, home_viewers=viewers),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield SlackWorld(standin, f"http://127.0.0.1:{port}", configured, viewers)
    server.should_exit = True
    thread.join(10)
    standin.stop()


def deliver_all(slack: SlackWorld, engine) -> None:
    """Relay every pending job event to the stand-in, as the bot's notifier does, until none is
    left."""
    from bot.notifier import Notifier, relay_client
    from storage.artifacts import ArtifactStore

    notifier = Notifier(
        engine,
        relay_client(slack.standin.bot_token, slack.settings.slack_api_url),
        ArtifactStore(slack.settings.artifact_dir),
        channel_interval=0.0,
    )
    try:
        while notifier.deliver_pending():
            pass
    finally:
        notifier.close()
