"""``finetune-bot`` from any directory: its children run in the repository, so every relative
setting must resolve against where the user started it, once, for every process."""

from __future__ import annotations

import json
import sqlite3

from runner.models import TINY_MODEL_BUILD
from tests.conftest import PreparedElsewhere


def test_prepare_from_another_directory_uses_that_directorys_var(
    prepared_elsewhere: PreparedElsewhere,
) -> None:
    """The first run of `prepare` in a fresh directory (tests/conftest.py runs it once)."""
    assert prepared_elsewhere.done.returncode == 0, prepared_elsewhere.output
    database = prepared_elsewhere.cwd / "var" / "finetune.db"
    with sqlite3.connect(database) as connection:
        names = [row[0] for row in connection.execute("SELECT name FROM datasets")]
    assert names == ["news-demo"]
    tiny = prepared_elsewhere.cwd / "var" / "artifacts" / "models" / TINY_MODEL_BUILD
    assert (tiny / "config.json").exists()
    assert json.loads((tiny / "provenance.json").read_text(encoding="utf-8"))["headlines"] > 9000
