"""``finetune-bot`` from any directory: its children run in the repository, so every relative
setting must resolve against where the user started it, once, for every process."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from runner.models import TINY_MODEL_BUILD
from tests.conftest import REPO


def test_prepare_from_another_directory_uses_that_directorys_var(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "ARTIFACT_DIR", "BASE_MODEL", "APPROVERS")
    }
    done = subprocess.run(
        [sys.executable, "-m", "stack", "prepare"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    database = tmp_path / "var" / "finetune.db"
    with sqlite3.connect(database) as connection:
        names = [row[0] for row in connection.execute("SELECT name FROM datasets")]
    assert names == ["news-demo"]
    tiny = tmp_path / "var" / "artifacts" / "models" / TINY_MODEL_BUILD
    assert (tiny / "config.json").exists()
    assert json.loads((tiny / "provenance.json").read_text(encoding="utf-8"))["headlines"] > 9000
