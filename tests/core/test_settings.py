from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_defaults_run_on_one_machine_with_no_services(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "ARTIFACT_DIR", "BASE_MODEL", "APPROVERS", "SLACK_BOT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.db_url == f"sqlite:///{Path.cwd() / 'var' / 'finetune.db'}"
    assert settings.artifact_dir == Path.cwd() / "var" / "artifacts"
    assert settings.base_model is None
    assert settings.approvers == []
    assert not settings.slack_configured


def test_approvers_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPROVERS", "U123, S456 ,U789")
    assert Settings(_env_file=None).approvers == ["U123", "S456", "U789"]


def test_placeholder_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "changethis")
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(_env_file=None)


def test_secrets_do_not_show_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-123-real-token")
    assert "xoxb-123-real-token" not in repr(Settings(_env_file=None))


def test_relative_paths_resolve_once_against_the_starting_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Child processes start elsewhere (the repository): they must get absolute paths."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "sqlite:///data/x.db")
    monkeypatch.setenv("ARTIFACT_DIR", "store")
    settings = Settings(_env_file=None)
    assert settings.db_url == f"sqlite:///{tmp_path / 'data' / 'x.db'}"
    assert settings.artifact_dir == tmp_path / "store"
    postgres = "postgresql+psycopg://finetune:p%40ss@db:5432/finetune"
    assert Settings(_env_file=None, database_url=postgres).db_url == postgres
    assert Settings(_env_file=None, database_url="sqlite://").db_url == "sqlite://"


def test_the_database_password_never_shows(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://finetune:hunter2@db:5432/finetune")
    settings = Settings(_env_file=None)
    assert "hunter2" in settings.db_url  # what engines and child processes get
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert settings.db_url_redacted == "postgresql+psycopg://finetune:***@db:5432/finetune"


def test_blank_secrets_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-real-token")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "")  # as .env.example ships it
    settings = Settings(_env_file=None)
    assert settings.slack_signing_secret is None and not settings.slack_configured
