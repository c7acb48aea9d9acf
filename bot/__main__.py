"""``python -m bot``: Socket Mode when SLACK_APP_TOKEN is set; ``--http --port N`` serves
``POST /slack/events``; ``console`` (the default without Slack credentials) runs the same app in
this terminal."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    parser.add_argument(
        "mode",
        nargs="?",
        choices=["console"],
        help="console: the app in this terminal, no Slack needed",
    )
    parser.add_argument("--http", action="store_true", help="serve POST /slack/events")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    from core.errors import FinetuneError
    from core.logs import configure_logging
    from core.settings import Settings

    settings = Settings()
    if args.mode == "console" or not settings.slack_configured:
        import logging

        from bot.console import run_console

        configure_logging(default="text", level=logging.WARNING)  # the terminal is the UI
        return run_console(settings)
    configure_logging()
    try:
        if args.http or settings.slack_app_token is None:
            import uvicorn

            from bot.app import create_http_app

            uvicorn.run(create_http_app(settings), host=args.host, port=args.port, log_config=None)
        else:
            from slack_bolt.adapter.socket_mode import SocketModeHandler

            from bot.app import create_app, start_notifier
            from bot.home import HomeViewers

            viewers = HomeViewers()  # who opened their home: the notifier pushes it too
            app = create_app(settings, socket_mode=True, home_viewers=viewers)
            start_notifier(settings, home_viewers=viewers)
            SocketModeHandler(app, settings.slack_app_token.get_secret_value()).start()
    except FinetuneError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
