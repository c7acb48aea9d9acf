"""Shared fixtures. Each test gets its own database: a SQLite file, or a fresh PostgreSQL database
created on the server at TEST_POSTGRES_URL (default: the local server every machine here runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from core.settings import Settings
from runner.models import TINY_MODEL_BUILD
from runner.models import tiny_model_dir as tiny_model_dir_for
from storage.artifacts import ArtifactStore
from storage.db import make_engine
from storage.migrate import upgrade

POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REPO = Path(__file__).resolve().parents[1]
DEMO_DATASET = REPO / "examples" / "news_demo"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"ftb_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(database_url=db_url, artifact_dir=tmp_path / "artifacts", _env_file=None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runner.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from runner.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@dataclass
class PreparedElsewhere:
    cwd: Path  # the directory `finetune-bot prepare` was started from
    done: subprocess.CompletedProcess[str]

    @property
    def output(self) -> str:
        return self.done.stdout[-2000:] + self.done.stderr[-2000:]


@pytest.fixture(scope="session")
def prepared_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> PreparedElsewhere:
    """`python -m stack prepare` run once per session, as a first run from a fresh directory
    outside the repository: it builds the pre-trained tiny model for real (a minute or two on two
    cores) into that directory's var/. tests/test_stack.py checks that run; the end-to-end test
    copies the model it built instead of building its own. Not asserted here, so that a failed
    run is reported, with its output, by the tests that use it."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "ARTIFACT_DIR", "BASE_MODEL", "APPROVERS")
    }
    done = subprocess.run(
        [sys.executable, "-m", "stack", "prepare"],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return PreparedElsewhere(cwd, done)


@pytest.fixture(scope="session")
def pretrained_tiny_model(prepared_elsewhere: PreparedElsewhere) -> Path:
    """The pre-trained tiny base (BASE_MODEL unset) that the session's first-run `prepare` built."""
    built = prepared_elsewhere.cwd / "var" / "artifacts" / "models" / TINY_MODEL_BUILD
    assert (built / "config.json").exists(), prepared_elsewhere.output
    return built


def install_pretrained_tiny_model(built: Path, settings: Settings) -> None:
    """Copy the session's pre-trained tiny base (5-6 MB) to where ``settings`` looks for it, so a
    test whose ARTIFACT_DIR is new finds the model built instead of building it (a minute or two
    on two cores; tests/test_stack.py checks that build)."""
    shutil.copytree(built, tiny_model_dir_for(settings))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With FTB_FAIL_ON_SKIP=1 (scripts/test.sh, CI) a skipped test fails the run."""
    if os.environ.get("FTB_FAIL_ON_SKIP") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and exitstatus == 0:
        reporter.write_line(
            f"FAILED: {skipped} test(s) skipped; skips do not count as passes", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
