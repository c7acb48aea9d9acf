"""Continued pre-training (``stage=pt``): raw-text documents as training sequences with loss on
every token, and a stage=pt checkpoint made into a base model for a later SFT job
(``base=checkpoint-N``).

The base of such an SFT job is the pt checkpoint *merged*: its LoRA folded into the base weights
once, into ``ARTIFACT_DIR/models/checkpoint-N`` (a whole model, as an export is), and the SFT
job's LoRA trains on top of that. A full or freeze pt checkpoint is a whole model already and is
copied there as it is. The SFT job's ``base_model`` is ``checkpoint-N`` and its checkpoints'
``meta.json`` carry ``base_checkpoint`` (which pt checkpoint, of which job and dataset).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.protocol import TrainingExample
from core.settings import Settings
from runner.config import TrainConfig
from runner.datasets.raw_text import document_chunks, document_ids
from runner.models import checkpoint_base_dir, model_dir_for
from storage.artifacts import ArtifactStore
from storage.models import Checkpoint

log = logging.getLogger(__name__)

_NOT_COPIED = {"training_state.pt", "meta.json"}


def pt_examples(
    tokenizer: Any, documents: Sequence[str], config: TrainConfig
) -> list[TrainingExample]:
    """Each document (its tokens and EOS) as one sequence, or as ``cutoff_len`` chunks
    (``long_docs``); ``prompt_len`` 0, so every token after the first is a target."""
    examples = []
    for document in documents:
        ids = document_ids(tokenizer, document)
        for chunk in document_chunks(ids, config.cutoff_len, config.long_docs):
            if len(chunk) >= 2:  # a lone token predicts nothing
                examples.append(TrainingExample(chunk, 0))
    return examples


def checkpoint_base_meta(checkpoint: Checkpoint) -> dict[str, Any]:
    """Provenance of a ``base=checkpoint-N`` job, for its checkpoints' meta.json."""
    return {
        "id": checkpoint.id,
        "job_id": checkpoint.job_id,
        "step": checkpoint.step,
        "base_model": checkpoint.base_model,
        "dataset": checkpoint.meta.get("dataset"),
        "merged": bool(checkpoint.meta.get("adapter", True)),
    }


def ensure_checkpoint_base(
    store: ArtifactStore,
    settings: Settings,
    checkpoint: Checkpoint,
    on_status: Callable[[str], None] = lambda message: None,
) -> Path:
    """The directory of base model ``checkpoint-N``: written once (merged or copied), then
    reused by every job, evaluation and export on that base."""
    from runner.export import merge_adapter, save_tokenizer

    name = f"checkpoint-{checkpoint.id}"
    out = checkpoint_base_dir(settings, name)
    if (out / "config.json").exists():
        return out
    source = store.path(checkpoint.path)
    base_dir = model_dir_for(settings, checkpoint.base_model, on_status=on_status)
    assert base_dir is not None
    adapter = bool(checkpoint.meta.get("adapter", True))
    on_status(
        f"merging stage=pt checkpoint {checkpoint.id}'s adapter into {checkpoint.base_model}"
        if adapter
        else f"using stage=pt checkpoint {checkpoint.id}'s weights as the base"
    )
    relpath = out.relative_to(store.root).as_posix()
    try:
        with store.staged_dir(relpath) as staging:
            if adapter:
                merge_adapter(base_dir, source, staging, "5GB")
            else:
                for entry in source.iterdir():
                    if entry.name not in _NOT_COPIED and entry.is_file():
                        shutil.copy2(entry, staging / entry.name)
            save_tokenizer(base_dir, staging)  # a whole-model checkpoint carries no tokenizer
            provenance = checkpoint_base_meta(checkpoint)
            (staging / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    except FileExistsError:  # another job wrote it meanwhile
        pass
    log.info("base model %s ready at %s", name, out)
    return out
