"""``finetune-bot`` (or ``python -m stack``): the whole product on one machine, on its embedded
defaults (SQLite under ./var, the tiny local model unless BASE_MODEL is set, CPU).

    finetune-bot             prepare, start serving and a runner, then the bot: the console in this
                             terminal without Slack credentials, the Slack app with them
    finetune-bot --demo      the same, then play the whole flow by itself and print it: upload, train,
                             evaluate, refused and approved clicks, /classify, rollback
    finetune-bot prepare     only prepare: migrate, the base model, the demo dataset

Preparing runs the commands an operator would: ``python -m storage migrate``, the tiny model when
BASE_MODEL is unset, ``python -m runner ingest`` of the demo dataset once. Serving and the runner run
as child processes (logs under ./var/logs) and stop with it.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEMO_DATASET = REPO / "examples" / "news_demo"
DEMO_NAME = "news-demo"

log = logging.getLogger("stack")


def _step(settings: Settings, *args: str) -> None:
    from stack.processes import process_env

    log.info("$ python %s", " ".join(args))
    subprocess.run([sys.executable, *args], check=True, cwd=REPO, env=process_env(settings))


def prepare(settings: Settings) -> None:
    from runner.models import local_model_dir
    from storage.datasets import find_own_dataset
    from storage.db import make_engine, new_session

    _step(settings, "-m", "storage", "migrate")
    model_dir = local_model_dir(settings)
    log.info("base model: %s", model_dir or settings.base_model)
    engine = make_engine(settings.db_url)
    with new_session(engine) as session:
        demo = find_own_dataset(session, name=DEMO_NAME, channel_id=None)  # the deployment's
    engine.dispose()
    if demo is None:
        _step(settings, "-m", "runner", "ingest", str(DEMO_DATASET), "--name", DEMO_NAME)
    else:
        log.info("demo dataset already stored: %s v%d (id %d)", demo.name, demo.version, demo.id)
    log.info("ready: database %s, artifacts in %s", settings.db_url_redacted, settings.artifact_dir)


def up(settings: Settings, *, demo: bool) -> int:
    from stack.processes import start_stack

    started = time.monotonic()
    prepare(settings)
    stack = start_stack(settings)
    log.info("serving and the runner are up (%.0f s since start)", time.monotonic() - started)
    try:
        if settings.slack_configured and not demo:
            log.info("Slack credentials found: starting the Slack app")
            return subprocess.run(
                [sys.executable, "-m", "bot"], env=stack.env, check=False
            ).returncode
        # From here the terminal is the conversation: only warnings from in-process loggers.
        logging.getLogger().setLevel(logging.WARNING)
        if demo:
            return play_demo(stack.settings, started)
        from bot.console import run_console

        return run_console(stack.settings)
    finally:
        stack.stop()


def play_demo(settings: Settings, started: float) -> int:
    from bot.console import Console
    from stack.demo import Demo

    console = Console(settings)
    try:
        seen = Demo(console).play()
    finally:
        console.close()
    from bot.console import blocks_text

    lines = blocks_text(seen["classified"].get("blocks") or []).splitlines() or [""]
    answered = next((line for line in lines if "←" in line), lines[0]).strip()
    report = blocks_text(seen["report"].get("blocks") or []).splitlines()
    accuracy = next((line.strip() for line in report if line.strip().startswith("*Accuracy*")), "")
    scored = f" Its evaluation: {accuracy.replace('*', '')}." if accuracy else ""
    console.say(
        f"\ndemo finished in {time.monotonic() - started:.0f} s: job {seen['job_id']} trained, "
        f"evaluated, approved and served ({answered}), then rolled back to the base model."
        f"{scored} (The tiny base is a 1.4M-parameter model pre-trained for about a minute on "
        "news headlines, a stand-in for what a real base knows; set BASE_MODEL for a real model.)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-bot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", default="up", choices=["up", "prepare"])
    parser.add_argument("--demo", action="store_true", help="play the whole flow and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "alembic"):  # a request line per Slack call; migration chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings()
    if args.command == "prepare":
        prepare(settings)
        return 0
    return up(settings, demo=args.demo)


if __name__ == "__main__":
    sys.exit(main())
