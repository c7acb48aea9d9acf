"""Shared fixtures. Each test gets its own database: a SQLite file, or a fresh PostgreSQL database
created on the server at TEST_POSTGRES_URL (default: the local server every machine here runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
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


PREPARE = [sys.executable, "-m", "stack", "prepare"]
NEEDS_PREPARE = "prepared_elsewhere"


def _shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temporary root, the same for every pytest-xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _start_prepare(shared: Path) -> None:
    """`python -m stack prepare` in the background from a fresh directory outside the
    repository, once per session (the first worker to get here starts it, under a lock); its
    output and exit status land in ``shared``."""
    from filelock import FileLock

    with FileLock(str(shared / "prepare.lock")):
        cwd = shared / "elsewhere"
        if cwd.exists():
            return
        cwd.mkdir()
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "ARTIFACT_DIR", "BASE_MODEL", "APPROVERS")
        }
        script = '"$@" > ../prepare.out 2> ../prepare.err; echo $? > ../prepare.rc'
        subprocess.Popen(
            ["sh", "-c", script, "prepare", *PREPARE],
            cwd=cwd,
            env={**env, "PYTHONPATH": str(REPO)},
            start_new_session=True,
        )


@pytest.fixture(scope="session", autouse=True)
def _prepare_in_the_background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Start the first-run `prepare` (a minute or two of pre-training) with the session's first
    test when any collected test needs it; those tests run last (``pytest_collection_modifyitems``)
    and so rarely wait for it."""
    if any(NEEDS_PREPARE in getattr(i, "fixturenames", ()) for i in request.session.items):
        _start_prepare(_shared_dir(tmp_path_factory))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that need the first-run `prepare` last (stable otherwise)."""
    items.sort(key=lambda item: NEEDS_PREPARE in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def prepared_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> PreparedElsewhere:
    """`python -m stack prepare` run once per session, as a first run from a fresh directory
    outside the repository: it builds the pre-trained tiny model for real (a minute or two on two
    cores) into that directory's var/. tests/test_stack.py checks that run; the end-to-end test
    copies the model it built instead of building its own. Not asserted here, so that a failed
    run is reported, with its output, by the tests that use it. It starts in the background with
    the session (``_prepare_in_the_background``); under pytest-xdist (scripts/test.sh runs two
    workers) every worker waits for that one run: the tests only read its directory."""
    shared = _shared_dir(tmp_path_factory)
    _start_prepare(shared)  # started already, unless this test's session did not collect it first
    rc, deadline = shared / "prepare.rc", time.monotonic() + 900
    while not (rc.exists() and rc.read_text().strip()):
        assert time.monotonic() < deadline, "`prepare` did not end within 15 minutes"
        time.sleep(0.5)
    done = subprocess.CompletedProcess(
        PREPARE,
        int(rc.read_text()),
        (shared / "prepare.out").read_text(encoding="utf-8", errors="replace"),
        (shared / "prepare.err").read_text(encoding="utf-8", errors="replace"),
    )
    return PreparedElsewhere(shared / "elsewhere", done)


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
