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
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.standin import SlackStandIn, signed_headers, slash_command_body
from storage.migrate import upgrade

SECRET = "bench-signing-secret"


SERVER = """
import sys, uvicorn
from bot.app import create_http_app
from core.settings import Settings
settings = Settings(_env_file=None)
app = create_http_app(settings, notifier=False, process_before_response=sys.argv[2] == "1")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def serve(env: dict[str, str], *, before_response: bool) -> tuple[subprocess.Popen, str]:
    """The bot in its own process, as Slack would reach it (not sharing our GIL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), "1" if before_response else "0"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    return process, f"http://127.0.0.1:{port}/slack/events"


def measure(url: str, response_url: str, requests: int) -> list[float]:
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    with httpx.Client(timeout=30, limits=limits) as client:  # one client: no per-call setup

        def one(i: int) -> float:
            body = slash_command_body(
                "/finetune", "list", user_id=f"U{i:04d}", response_url=response_url
            )
            headers = signed_headers(SECRET, body)
            started = time.perf_counter()
            response = client.post(url, content=body, headers=headers)
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
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "ARTIFACT_DIR": str(root / "artifacts"),
        "SLACK_BOT_TOKEN": standin.bot_token,
        "SLACK_SIGNING_SECRET": SECRET,
        "SLACK_API_URL": api,
        "LOG_FORMAT": "text",
    }
    rows = []
    for name, before in (
        ("ours: ack first, answer via response_url", False),
        ("baseline: answer before the response (process_before_response)", True),
    ):
        server, endpoint = serve(env, before_response=before)
        measure(endpoint, standin.response_url(), 5)  # warm up
        latencies = sorted(
            x
            for _ in range(args.rounds)
            for x in measure(endpoint, standin.response_url(), args.requests)
        )
        server.terminate()
        server.wait(30)
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
