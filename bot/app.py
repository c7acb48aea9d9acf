"""``create_app``: the slack-bolt app with every listener registered. Builds nothing at import."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from core.errors import ConfigError
from core.settings import Settings

if TYPE_CHECKING:
    from bot.home import HomeViewers

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    socket_mode: bool = False,
    process_before_response: bool = False,
    home_viewers: HomeViewers | None = None,
) -> Any:
    """``socket_mode``: requests arrive over the Socket Mode websocket (``SLACK_APP_TOKEN``),
    unsigned, so no signing secret is needed; otherwise over HTTP, each verified against
    ``SLACK_SIGNING_SECRET``. ``process_before_response`` is bolt's FaaS mode (listeners finish
    before the HTTP response); only bench/bot_ack.py turns it on, as the baseline.
    ``home_viewers``: who opened their App Home, shared with this process's notifier
    (``start_notifier``), which pushes their homes when jobs they see change."""
    from concurrent.futures import ThreadPoolExecutor

    from slack_bolt import App

    from bot import actions, commands, events, feedback, home, sweeps
    from bot.auth import Approvers
    from bot.home import HomeViewers
    from runner.models import base_model_name
    from storage.db import make_engine
    from storage.migrate import check_schema

    token, secret = _given(settings.slack_bot_token), _given(settings.slack_signing_secret)
    if token is None:
        raise ConfigError(
            "SLACK_BOT_TOKEN must be set for Slack (without it, use `python -m bot console`)"
        )
    if socket_mode and _given(settings.slack_app_token) is None:
        raise ConfigError("Socket Mode needs SLACK_APP_TOKEN (an app-level xapp- token)")
    if not socket_mode and secret is None:
        raise ConfigError(
            "HTTP mode needs SLACK_SIGNING_SECRET to verify Slack's requests (Socket Mode, with "
            "SLACK_APP_TOKEN set and without --http, does not)"
        )
    client = listener_client(token, settings.slack_api_url)
    app = App(
        # Socket Mode requests are not signed: bolt's RequestVerification lets them through,
        # and with an empty secret it refuses any HTTP request (its verifier will not take "")
        # instead of accepting it unverified. "" also keeps bolt from reading the environment.
        signing_secret=secret or "",
        client=client,
        name="finetune-bot",
        process_before_response=process_before_response,
        # Every request waits until its listener calls ack(): a listener thread must be free at
        # once, so the pool is sized for a burst of commands, not for the cores.
        listener_executor=ThreadPoolExecutor(max_workers=64, thread_name_prefix="listener"),
    )
    db = make_engine(settings.db_url)
    check_schema(db)
    context = commands.BotContext(
        settings=settings,
        db=db,
        approvers=Approvers(settings.approvers, client),
        base_model=base_model_name(settings),
        home_viewers=home_viewers if home_viewers is not None else HomeViewers(),
    )
    commands.register(app, context)
    commands.register_classify(app, context)
    commands.register_views(app, context)
    actions.register(app, context)
    feedback.register(app, context)
    events.register(app, context)
    home.register(app, context)
    sweeps.register(app, context)
    return app


def _given(value: SecretStr | None) -> str | None:
    """A secret's value, or None when it is unset or blank (``SLACK_SIGNING_SECRET=`` in .env)."""
    if value is None or not value.get_secret_value().strip():
        return None
    return value.get_secret_value()


def listener_client(token: str, base_url: str) -> Any:
    """The client listeners answer through: a reset connection is retried once, and a 429 is
    waited out (Retry-After) and retried once, inside the listener's own thread."""
    from slack_sdk import WebClient
    from slack_sdk.http_retry.builtin_handlers import (
        ConnectionErrorRetryHandler,
        RateLimitErrorRetryHandler,
    )

    return WebClient(
        token=token,
        base_url=base_url,
        retry_handlers=[ConnectionErrorRetryHandler(), RateLimitErrorRetryHandler()],
    )


def start_notifier(settings: Settings, *, home_viewers: HomeViewers | None = None) -> Any:
    """The outbox relay, with a Slack client of its own, in a daemon thread (it republishes the
    App Homes that show jobs whose state changed: their requesters', and those of
    ``home_viewers`` who see them); returns the event that stops it (and lets go of the relay
    lock)."""
    import threading

    from bot.auth import Approvers
    from bot.home import HomeRefresher
    from bot.notifier import Notifier, relay_client
    from bot.permalinks import Permalinks
    from runner.models import base_model_name
    from storage.artifacts import ArtifactStore
    from storage.db import make_engine

    token = _given(settings.slack_bot_token)
    if token is None:
        raise ConfigError("SLACK_BOT_TOKEN must be set for the notifier to post to Slack")
    stop = threading.Event()
    db = make_engine(settings.db_url)
    client = relay_client(token, settings.slack_api_url)
    permalinks = Permalinks()  # one cache for the homes and the threads it writes
    homes = HomeRefresher(
        db,
        client,
        Approvers(settings.approvers, client),
        base_model_name(settings),
        interval=settings.home_refresh_seconds,
        permalinks=permalinks,
        viewers=home_viewers,
    )
    notifier = Notifier(
        db, client, ArtifactStore(settings.artifact_dir), homes=homes, permalinks=permalinks
    )
    threading.Thread(target=notifier.run, args=(stop,), name="notifier", daemon=True).start()
    return stop


def create_http_app(
    settings: Settings,
    *,
    notifier: bool = True,
    process_before_response: bool = False,
    home_viewers: HomeViewers | None = None,
) -> Any:
    """A Starlette app serving ``POST /slack/events`` (commands, interactivity, events), and
    (``notifier``) the outbox relay; both share ``home_viewers``."""
    from slack_bolt.adapter.starlette.handler import to_bolt_request, to_starlette_response
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from bot.home import HomeViewers

    viewers = home_viewers if home_viewers is not None else HomeViewers()
    app = create_app(
        settings, process_before_response=process_before_response, home_viewers=viewers
    )
    stop = start_notifier(settings, home_viewers=viewers) if notifier else None

    async def events(request: Request) -> Response:
        # bolt's sync dispatch waits for ack(): run it off the event loop, or concurrent
        # requests are served one at a time (bolt's own Starlette adapter calls it inline).
        bolt_request = to_bolt_request(request, await request.body())
        bolt_response = await run_in_threadpool(app.dispatch, bolt_request)
        return to_starlette_response(bolt_response)  # type: ignore[no-any-return]

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    web = Starlette(
        routes=[Route("/slack/events", events, methods=["POST"]), Route("/healthz", healthz)]
    )
    web.state.notifier_stop = stop  # set it to stop the notifier thread
    return web
