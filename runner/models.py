"""Base models: where the weights of ``BASE_MODEL`` are on this machine.

A base model is a local directory or a ModelScope id cached under ``ARTIFACT_DIR/models``. With
``BASE_MODEL`` unset, the product runs on the tiny local model (``runner.tiny_model``), built on
first use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.settings import Settings

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny"


def tiny_model_dir(settings: Settings) -> Path:
    return Path(settings.artifact_dir).resolve() / "models" / TINY_MODEL_NAME


def modelscope_cache_dir(settings: Settings, model_id: str) -> Path:
    return Path(settings.artifact_dir).resolve() / "models" / "modelscope" / model_id


def base_model_name(settings: Settings) -> str:
    """The name recorded on jobs and checkpoints for the configured base model."""
    if settings.base_model is None:
        return TINY_MODEL_NAME
    return settings.base_model


def local_model_dir(settings: Settings, *, build_tiny: bool = True) -> Path | None:
    """The directory holding the base model's files, or None if a hub model is not fetched yet."""
    if settings.base_model is None:
        path = tiny_model_dir(settings)
        if not (path / "config.json").exists():
            if not build_tiny:
                return None
            from runner.tiny_model import build_tiny_model

            log.info("building the tiny local model in %s", path)
            build_tiny_model(path)
        return path
    candidate = Path(settings.base_model).expanduser()
    if candidate.is_dir():
        if not (candidate / "config.json").exists():
            raise ConfigError(
                f"BASE_MODEL {settings.base_model} is a folder without config.json:"
                " point it at a Hugging Face model directory"
            )
        return candidate.resolve()
    cached = modelscope_cache_dir(settings, settings.base_model)
    return cached if (cached / "config.json").exists() else None


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_for_report(settings: Settings, model_dir: Path | None = None) -> tuple[Any, str]:
    """The tokenizer used for token lengths in dataset reports, and a note saying which."""
    path = model_dir or local_model_dir(settings)
    if path is None:
        return None, (f"not computed: base model {settings.base_model} is not downloaded yet")
    return load_tokenizer(
        path
    ), f"tokenizer of {path.name if model_dir else base_model_name(settings)}"
