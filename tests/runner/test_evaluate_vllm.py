"""vLLM and transformers predict the same under greedy decoding, through the real CLI.

It does not touch what differs between databases, so it runs on SQLite only (each vLLM start
costs ~15 s on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import select

from core.settings import Settings
from storage.db import new_session
from storage.models import Checkpoint
from tests.conftest import REPO
from tests.runner.conftest import train_job as _train


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


def _cli_evaluate(settings: Settings, model: str, backend: str) -> list[str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.db_url,
        "ARTIFACT_DIR": str(settings.artifact_dir),
        "BASE_MODEL": settings.base_model,
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "evaluate",
            model,
            "--dataset",
            "syn",
            "--backend",
            backend,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["backend"] == backend
    path = Path(settings.artifact_dir) / report["report_path"] / "generated_predictions.jsonl"
    return [json.loads(line)["predict"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_vllm_and_transformers_predict_the_same_under_greedy_decoding(
    engine,
    eval_settings,
    dataset,
) -> None:
    job = _train(engine, eval_settings, dataset)
    with new_session(engine) as session:
        final = session.exec(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.final)
        ).one()
    for model in ("base", str(final.id)):
        with_vllm = _cli_evaluate(eval_settings, model, "vllm")
        with_transformers = _cli_evaluate(eval_settings, model, "transformers")
        assert with_vllm == with_transformers, model
