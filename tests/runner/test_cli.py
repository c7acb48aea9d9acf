"""`python -m runner ingest|validate` and `python -m storage migrate` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import select

from storage.db import make_engine, new_session
from storage.models import Dataset
from tests.conftest import DEMO_DATASET, REPO
from tests.runner import dataset_files as files


def _run(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=REPO,
        timeout=300,
    )


@pytest.fixture
def cli_env(tmp_path: Path, db_url: str, tiny_model_dir: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "BASE_MODEL": str(tiny_model_dir),
    }


def test_validate_prints_the_report_as_json_and_stores_nothing(cli_env, tmp_path) -> None:
    zip_path = files.tutorial_zip(tmp_path / "data_news_300.zip")
    result = _run("runner", "validate", str(zip_path), "--json", env=cli_env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == {"train": 300, "eval": 100}
    assert report["splits"]["eval"]["tokens"]["max"] > 0
    assert not (tmp_path / "artifacts" / "blobs").exists()


def test_validate_rejection_exits_non_zero_with_the_reason(cli_env, tmp_path) -> None:
    path = files.write_json(tmp_path / "d.json", [{"question": "q"}])
    result = _run("runner", "validate", str(path), env=cli_env)
    assert result.returncode == 1
    assert "unknown format" in result.stderr
    as_json = _run("runner", "validate", str(path), "--json", env=cli_env)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["accepted"] is False


def test_ingest_needs_a_migrated_database_then_stores(cli_env) -> None:
    refused = _run("runner", "ingest", str(DEMO_DATASET), "--name", "news", env=cli_env)
    assert refused.returncode == 2 and "python -m storage migrate" in refused.stderr
    migrated = _run("storage", "migrate", env=cli_env)
    assert migrated.returncode == 0, migrated.stderr
    result = _run("runner", "ingest", str(DEMO_DATASET), "--name", "news", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "Stored dataset news v1" in result.stdout
    assert "train: 300 samples, 300 with <think>" in result.stdout
    engine = make_engine(cli_env["DATABASE_URL"])
    with new_session(engine) as session:
        rows = session.exec(select(Dataset)).all()
    engine.dispose()
    assert [(d.name, d.train_samples, d.eval_samples) for d in rows] == [("news", 300, 100)]


def test_ingest_refuses_a_bad_name(cli_env) -> None:
    result = _run("runner", "ingest", str(DEMO_DATASET), "--name", "no spaces", env=cli_env)
    assert result.returncode == 2 and "dataset name 'no spaces' is not allowed" in result.stderr
