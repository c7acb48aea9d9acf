"""``create_app``: the slack-bolt app with every listener registered. Builds nothing at import."""

from __future__ import annotations

import logging
from typing import Any

from core.errors import ConfigError
from core.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, process_before_response: bool = False) -> Any:
    """``process_before_response`` is bolt's FaaS mode (listeners finish before the HTTP
    response); only bench/bot_ack.py turns it on, as the baseline."""
    from concurrent.futures import ThreadPoolExecutor

    from slack_bolt import App
    from slack_sdk import WebClient

    from bot import actions, commands, events
    from bot.auth import Approvers
    from runner.models import base_model_name
    from storage.db import make_engine
    from storage.migrate import check_schema

    if settings.slack_bot_token is None or settings.slack_signing_secret is None:
        raise ConfigError(
            "SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET must be set for Slack "
            "(without them, use `python -m bot console`)"
        )
    token = settings.slack_bot_token.get_secret_value()
    client = WebClient(token=token, base_url=settings.slack_api_url)
    app = App(
        signing_secret=settings.slack_signing_secret.get_secret_value(),
        client=client,
        name="finetune-bot",
        process_before_response=process_before_response,
        # Every request waits until its listener calls ack(): a listener thread must be free at
        # once, so the pool is sized for a burst of commands, not for the cores.
        listener_executor=ThreadPoolExecutor(max_workers=64, thread_name_prefix="listener"),
    )
    db = make_engine(settings.database_url)
    check_schema(db)
    context = commands.BotContext(
        settings=settings,
        db=db,
        approvers=Approvers(settings.approvers, client),
        base_model=base_model_name(settings),
    )
    commands.register(app, context)
    commands.register_classify(app, context)
    commands.register_views(app, context)
    actions.register(app, context)
    events.register(app, context)
    return app


def start_notifier(settings: Settings, client: Any) -> Any:
    """The outbox relay in a daemon thread; returns the event that stops it."""
    import threading

    from bot.notifier import Notifier
    from storage.artifacts import ArtifactStore
    from storage.db import make_engine

    stop = threading.Event()
    notifier = Notifier(
        make_engine(settings.database_url), client, ArtifactStore(settings.artifact_dir)
    )
    threading.Thread(target=notifier.run, args=(stop,), name="notifier", daemon=True).start()
    return stop


def create_http_app(
    settings: Settings, *, notifier: bool = True, process_before_response: bool = False
) -> Any:
    """A Starlette app serving ``POST /slack/events`` (commands, interactivity, events)."""
    from slack_bolt.adapter.starlette.handler import to_bolt_request, to_starlette_response
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    app = create_app(settings, process_before_response=process_before_response)
    stop = start_notifier(settings, app.client) if notifier else None

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
