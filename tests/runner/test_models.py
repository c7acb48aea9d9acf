"""Base models by ModelScope id: one download at a time however many jobs ask, and a cut download
never taken for a complete one. The hub is unreachable here, so modelscope's own download function
is replaced by one that writes a model folder the way it does (slowly, or failing half-way)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import modelscope
import pytest

from core.settings import Settings
from runner.models import ModelUnavailable, model_dir_for


@pytest.fixture
def hub_settings(tmp_path: Path) -> Settings:
    return Settings(_env_file=None, artifact_dir=tmp_path / "artifacts")


def test_concurrent_jobs_download_a_base_model_once(hub_settings, monkeypatch) -> None:
    calls: list[str] = []

    def slow_download(model_id: str, local_dir: str, endpoint: str | None = None) -> str:
        calls.append(model_id)
        time.sleep(0.5)
        (Path(local_dir) / "config.json").write_text("{}")
        return local_dir

    monkeypatch.setattr(modelscope, "snapshot_download", slow_download)
    found: list[Path] = []
    errors: list[BaseException] = []

    def job() -> None:
        try:
            found.append(model_dir_for(hub_settings, "deepseek-ai/Tiny-Model"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=job) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and len(found) == 3 and len(set(found)) == 1
    assert calls == ["deepseek-ai/Tiny-Model"]
    assert not (found[0] / ".incomplete").exists()


def test_a_cut_download_is_not_taken_for_a_model_and_resumes(hub_settings, monkeypatch) -> None:
    def cut(model_id: str, local_dir: str, endpoint: str | None = None) -> str:
        (Path(local_dir) / "config.json").write_text("{}")  # some files arrived, then it broke
        raise ConnectionError("connection reset")

    monkeypatch.setattr(modelscope, "snapshot_download", cut)
    with pytest.raises(ModelUnavailable, match="cannot download deepseek-ai/Tiny-Model"):
        model_dir_for(hub_settings, "deepseek-ai/Tiny-Model")
    assert model_dir_for(hub_settings, "deepseek-ai/Tiny-Model", download=False) is None

    def resumed(model_id: str, local_dir: str, endpoint: str | None = None) -> str:
        return local_dir

    monkeypatch.setattr(modelscope, "snapshot_download", resumed)
    path = model_dir_for(hub_settings, "deepseek-ai/Tiny-Model")
    assert (path / "config.json").exists() and not (path / ".incomplete").exists()
