from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_defaults_run_on_one_machine_with_no_services(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "ARTIFACT_DIR", "BASE_MODEL", "APPROVERS", "SLACK_BOT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.database_url == "sqlite:///./var/finetune.db"
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
