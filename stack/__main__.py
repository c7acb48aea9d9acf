"""``finetune-bot`` (or ``python -m stack``): the product on one machine, on its embedded defaults
(SQLite under ./var, the tiny local model unless BASE_MODEL is set).

Today it prepares everything the processes share: migrates the database, makes sure the base model
is on disk (building the tiny model when BASE_MODEL is unset) and ingests the demo dataset once,
printing its validation report. Each step runs the same command an operator would run by hand.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEMO_DATASET = REPO / "examples" / "news_demo"
DEMO_NAME = "news-demo"

log = logging.getLogger("stack")


def _step(*args: str) -> None:
    log.info("$ python %s", " ".join(args))
    subprocess.run([sys.executable, *args], check=True)


def up(settings: Settings) -> None:
    from runner.models import local_model_dir
    from storage.datasets import get_dataset
    from storage.db import make_engine, new_session

    _step("-m", "storage", "migrate")
    model_dir = local_model_dir(settings)
    log.info("base model: %s", model_dir or settings.base_model)
    engine = make_engine(settings.database_url)
    with new_session(engine) as session:
        demo = get_dataset(session, name=DEMO_NAME)
    engine.dispose()
    if demo is None:
        _step("-m", "runner", "ingest", str(DEMO_DATASET), "--name", DEMO_NAME)
    else:
        log.info("demo dataset already stored: %s v%d (id %d)", demo.name, demo.version, demo.id)
    log.info("ready: database %s, artifacts in %s", settings.database_url, settings.artifact_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-bot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", default="up", choices=["up"])
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    up(Settings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
