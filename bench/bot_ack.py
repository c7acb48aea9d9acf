"""Slack acknowledgement latency: 50 concurrent signed `/finetune list` commands against the bot in
HTTP mode (uvicorn on loopback, the Slack Web API stand-in, SQLite), p50/p99 of the HTTP response
time, which is what Slack's 3-second limit applies to. Baseline in the same process: the same app
with bolt's ``process_before_response=True`` (the listener runs before the response is sent).

    python bench/bot_ack.py [--requests 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.standin import SlackStandIn, signed_headers, slash_command_body
from core.settings import Settings
from storage.migrate import upgrade

SECRET = "bench-signing-secret"


def serve(settings: Settings, *, before_response: bool) -> tuple[uvicorn.Server, str]:
    from slack_bolt.adapter.starlette import SlackRequestHandler
    from starlette.applications import Starlette
    from starlette.routing import Route

    from bot.app import create_app

    app = create_app(settings, process_before_response=before_response)
    handler = SlackRequestHandler(app)

    async def events(request):
        return await handler.handle(request)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/slack/events", events, methods=["POST"])]),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/slack/events"


def measure(url: str, response_url: str, requests: int) -> list[float]:
    def one(i: int) -> float:
        body = slash_command_body(
            "/finetune", "list", user_id=f"U{i:04d}", response_url=response_url
        )
        started = time.perf_counter()
        response = httpx.post(url, content=body, headers=signed_headers(SECRET, body), timeout=30)
        response.raise_for_status()
        return time.perf_counter() - started

    with ThreadPoolExecutor(requests) as pool:
        return list(pool.map(one, range(requests)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ack-"))
    standin = SlackStandIn()
    api = standin.start()
    url = f"sqlite:///{root / 'bench.db'}"
    upgrade(url)
    settings = Settings(
        _env_file=None,
        database_url=url,
        artifact_dir=root / "artifacts",
        slack_bot_token=standin.bot_token,
        slack_signing_secret=SECRET,
        slack_api_url=api,
    )
    rows = []
    for name, before in (
        ("ours: ack first, answer via response_url", False),
        ("baseline: answer before the response (process_before_response)", True),
    ):
        server, endpoint = serve(settings, before_response=before)
        measure(endpoint, standin.response_url(), 5)  # warm up
        latencies = sorted(
            x
            for _ in range(args.rounds)
            for x in measure(endpoint, standin.response_url(), args.requests)
        )
        server.should_exit = True
        rows.append(
            (
                name,
                statistics.median(latencies) * 1000,
                latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
                len(latencies),
            )
        )
    standin.stop()
    lines = [
        "| path | requests (50 concurrent) | p50 ms | p99 ms | p99 vs baseline |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, p50, p99, n in rows:
        lines.append(f"| {name} | {n} | {p50:.0f} | {p99:.0f} | {rows[1][2] / p99:.1f}× |")
    text = "\n".join(lines)
    print(text)
    (args.out / "bot_ack.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
