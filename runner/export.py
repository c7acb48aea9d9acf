"""Export a checkpoint as a standalone model: the LoRA adapter merged into the base weights (PEFT
``merge_and_unload``), sharded safetensors, the tokenizer with the chat template the checkpoint was
trained with, and a ``meta.json``; with ``bits`` a bitsandbytes 8/4-bit copy of the merged model;
with ``quant`` one GGUF file (F16, Q8_0 or Q4_0) and an Ollama Modelfile (runner/export_gguf.py).

Nothing is announced before it is verified: the export is loaded fresh and run greedily on the eval
prompts of the checkpoint's dataset; a merged export must answer exactly as base + adapter (the
export fails otherwise), a quantized one reports how often its label agrees; an F16 GGUF must give
the same labels, a Q8_0/Q4_0 one reports label agreement and accuracy. Everything is written
under ``ARTIFACT_DIR/tmp`` and renamed to ``exports/…`` only when verified, so a failed or killed
export leaves nothing under its final name. The disk is checked before anything is written.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlmodel import Session

from core.enums import CheckpointStatus
from core.errors import ConfigError, Conflict, FinetuneError, NotFound
from core.protocol import PROTOCOL_VERSION, Message, parse_answer, render_prompt
from core.settings import Settings
from runner.models import load_tokenizer, model_dir_for
from storage.artifacts import ArtifactStore
from storage.evaluations import latest_evaluation
from storage.models import Checkpoint, Dataset, Job

log = logging.getLogger(__name__)

BITS = (4, 8)
VERIFY_SAMPLES = 200  # eval prompts run through the export (the eval split's first ones)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB)\s*$", re.IGNORECASE)


class ExportFailed(FinetuneError):
    code = "export_failed"


def parse_shard_size(text: str) -> str:
    """A shard size as transformers takes it (``5GB``, ``500MB``), checked.

    >>> parse_shard_size("5gb"), parse_shard_size("500 MB")
    ('5GB', '500MB')
    """
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        message = f"shard size {text!r} is not a size: use e.g. 5GB or 500MB"
        raise ConfigError(message, {"shard_size": message})
    return f"{match.group(1)}{match.group(2).upper()}"


def quantization_unavailable() -> str | None:
    """Why a bitsandbytes export cannot run here, or None when it can."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed on this runner (pip install bitsandbytes)"
    if not torch.cuda.is_available():
        return "bitsandbytes quantization needs a CUDA GPU and this runner has none"
    return None


def export_name(checkpoint_id: int, bits: int | None, quant: str | None = None) -> str:
    """Where an export is published, under ARTIFACT_DIR.

    >>> export_name(3, None), export_name(3, 4), export_name(3, None, "q8_0")
    ('exports/checkpoint-3', 'exports/checkpoint-3-int4', 'exports/checkpoint-3-gguf-q8_0')
    """
    if quant:
        return f"exports/checkpoint-{checkpoint_id}-gguf-{quant}"
    return f"exports/checkpoint-{checkpoint_id}" + (f"-int{bits}" if bits else "")


def check_export(
    session: Session,
    store: ArtifactStore,
    *,
    checkpoint_id: int,
    bits: int | None,
    quant: str | None = None,
    here: bool = True,
) -> Checkpoint:
    """Refuse what cannot be exported, before anything is queued or written. ``here``: also
    check that this machine can quantize (the runner; the bot only queues). The base model's
    architecture and tokenizer are checked for GGUF where the model is: in export_checkpoint."""
    if bits is not None and bits not in BITS:
        message = f"bits={bits} is not allowed: use 8 or 4 (or leave it out)"
        raise ConfigError(message, {"bits": message})
    if quant is not None:
        from runner.export_gguf import parse_quant

        if bits is not None:
            message = "bits= is for bitsandbytes copies; a GGUF export takes quant=f16|q8_0|q4_0"
            raise ConfigError(message, {"bits": message})
        parse_quant(quant)
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise NotFound(f"there is no checkpoint {checkpoint_id}: `/finetune list` shows them")
    if checkpoint.status == CheckpointStatus.rejected.value:
        raise Conflict(
            f"checkpoint {checkpoint_id} was rejected by {checkpoint.decided_by or 'an approver'}"
            ": rejected checkpoints are not exported"
        )
    if checkpoint.meta.get("stage") == "pt":
        raise Conflict(
            f"checkpoint {checkpoint_id} is continued pre-training (stage=pt): a job with "
            f"base=checkpoint-{checkpoint_id} merges it into a whole model "
            f"(ARTIFACT_DIR/models/checkpoint-{checkpoint_id}); export that job's checkpoint"
        )
    if not checkpoint.meta.get("adapter", True):
        raise Conflict(
            f"checkpoint {checkpoint_id} was trained with method={checkpoint.meta.get('method')}"
            f": it is already a whole model, at {store.path(checkpoint.path)}"
        )
    name = export_name(checkpoint_id, bits, quant)
    if store.path(name).exists():
        raise Conflict(
            f"checkpoint {checkpoint_id} is already exported at "
            f"{name}; delete that directory to export it again"
        )
    if here and bits is not None and (reason := quantization_unavailable()):
        message = f"bits={bits} cannot be exported here: {reason}"
        raise ConfigError(message, {"bits": message})
    return checkpoint


def weights_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))


def needed_bytes(base_dir: Path, bits: int | None, quant: str | None = None) -> int:
    """Disk an export needs at its peak: the merged copy, plus the quantized one for ``bits``
    (a GGUF export merges in memory: only its file), with 10% and 64 MiB to spare (tokenizer,
    rounding, the file system)."""
    merged = weights_bytes(base_dir)
    if quant:
        from runner.export_gguf import gguf_bytes

        config = json.loads((base_dir / "config.json").read_text())
        dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
        parameters = merged // (4 if dtype == "float32" else 2)
        return int(gguf_bytes(parameters, quant) * 1.1) + (64 << 20)
    quantized = merged * bits // 16 * 5 // 4 if bits else 0  # ~bits/16 of bf16, + scales
    return int((merged + quantized) * 1.1) + (64 << 20)


def check_disk(
    store: ArtifactStore, base_dir: Path, bits: int | None, quant: str | None = None
) -> int:
    store.root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store.root).free
    need = needed_bytes(base_dir, bits, quant)
    if free < need:
        raise ExportFailed(
            f"not enough disk for the export: it needs about {need / 1e9:.2f} GB and "
            f"{free / 1e9:.2f} GB are free under ARTIFACT_DIR ({store.root}); free space or "
            "point ARTIFACT_DIR at a larger disk"
        )
    return need


def export_checkpoint(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    *,
    checkpoint_id: int,
    bits: int | None = None,
    quant: str | None = None,
    shard_size: str = "5GB",
    on_status: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Merge, save, verify and publish; returns the report (also written to ``meta.json``).
    ``quant``: a GGUF export of that weight type instead of safetensors."""
    shard_size = parse_shard_size(shard_size)
    quant = quant and quant.lower()
    checkpoint = check_export(session, store, checkpoint_id=checkpoint_id, bits=bits, quant=quant)
    base_dir = model_dir_for(settings, checkpoint.base_model)
    assert base_dir is not None
    if quant:
        from runner.export_gguf import check_architecture, pre_tokenizer_name

        check_architecture(json.loads((base_dir / "config.json").read_text()))
        pre_tokenizer_name(load_tokenizer(base_dir), base_dir)  # refused before any work
    check_disk(store, base_dir, bits, quant)
    started = time.perf_counter()
    name = export_name(checkpoint_id, bits, quant)
    try:
        if quant:
            report = _write_gguf_export(
                session, store, settings, checkpoint, base_dir, name, quant, on_status, started
            )
        else:
            report = _write_export(
                session,
                store,
                settings,
                checkpoint,
                base_dir,
                name,
                bits,
                shard_size,
                on_status,
                started,
            )
    except OSError:
        if store.path(name).exists():  # another export of this checkpoint finished first
            raise Conflict(
                f"checkpoint {checkpoint_id} was exported by another job meanwhile, at {name}"
            ) from None
        raise
    log.info("exported checkpoint %d to %s (%d bytes)", checkpoint_id, name, report["bytes"])
    return report


def _write_export(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    checkpoint: Checkpoint,
    base_dir: Path,
    name: str,
    bits: int | None,
    shard_size: str,
    on_status: Callable[[str], None],
    started: float,
) -> dict[str, Any]:
    checkpoint_id = checkpoint.id
    adapter_dir = store.path(checkpoint.path)
    prompts, labels, max_new, _ = _eval_prompts(session, store, settings, checkpoint, base_dir)
    with store.staged_dir(name) as staging:
        merged_dir = staging if bits is None else store.tmp / f"{staging.name}-merged"
        try:
            on_status(f"merging checkpoint {checkpoint_id} into {checkpoint.base_model}")
            full_precision = merge_adapter(base_dir, adapter_dir, merged_dir, shard_size)
            if bits is not None:
                on_status(f"quantizing to {bits}-bit with bitsandbytes")
                _quantize(merged_dir, staging, bits, shard_size)
            save_tokenizer(base_dir, staging)
            on_status(f"verifying the export on {len(prompts)} eval prompts")
            verification = verify(
                base_dir,
                adapter_dir,
                staging,
                prompts,
                labels,
                max_new,
                exact=bits is None and full_precision,
                with_vllm=bits is None,
                settings=settings,
            )
        finally:
            if merged_dir != staging:
                shutil.rmtree(merged_dir, ignore_errors=True)
        report = {
            "checkpoint_id": checkpoint_id,
            "job_id": checkpoint.job_id,
            "base_model": checkpoint.base_model,
            "protocol_version": PROTOCOL_VERSION,
            "labels": checkpoint.meta.get("labels"),
            "eval": _eval_scores(session, checkpoint),
            "export": {
                "bits": bits,
                "format": "bitsandbytes" if bits else "merged",
                "shard_size": shard_size,
                "seconds": round(time.perf_counter() - started, 2),
            },
            "verification": verification,
            "path": name,
            "bytes": sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()),
        }
        (staging / "meta.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    return report


def _eval_prompts(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    checkpoint: Checkpoint,
    base_dir: Path,
) -> tuple[list[list[int]], list[str], int, list[str | None]]:
    """The eval prompts to verify on (fitted to the evaluation context as evaluation fits them),
    the label set, the answer budget evaluation uses, and each prompt's expected label."""
    from core.protocol import answer_of
    from runner.datasets.ingest import read_split
    from runner.eval.evaluate import derive_max_new_tokens, fit_prompt, prompt_room

    job = session.get(Job, checkpoint.job_id)
    dataset = session.get(Dataset, job.dataset_id) if job and job.dataset_id else None
    if dataset is None:
        raise ExportFailed(f"checkpoint {checkpoint.id}'s dataset is gone: nothing to verify on")
    split = dataset.eval_sha256 or dataset.train_sha256
    conversations = read_split(store, split)[:VERIFY_SAMPLES]
    tokenizer = load_tokenizer(base_dir)
    budget = derive_max_new_tokens(tokenizer, [answer_of(c) for c in conversations])
    room = prompt_room(settings.eval_max_model_len, budget)
    prompts = [fit_prompt(render_prompt(tokenizer, c[:-1]), room) for c in conversations]
    labels = list(dataset.labels or [])
    gold = [_label(answer_of(c), labels) for c in conversations]
    return prompts, labels, budget, gold


def _write_gguf_export(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    checkpoint: Checkpoint,
    base_dir: Path,
    name: str,
    quant: str,
    on_status: Callable[[str], None],
    started: float,
) -> dict[str, Any]:
    """Merge in memory, write the GGUF and its Modelfile under tmp/, verify, publish."""
    from core.protocol import PromptFrame
    from runner import export_gguf

    adapter_dir = store.path(checkpoint.path)
    prompts, labels, max_new, gold = _eval_prompts(session, store, settings, checkpoint, base_dir)
    tokenizer = load_tokenizer(base_dir)
    frame = PromptFrame.from_dict(checkpoint.meta.get("prompt_frame") or {})
    with store.staged_dir(name) as staging:
        on_status(f"merging checkpoint {checkpoint.id} into {checkpoint.base_model}")
        model = _merged_in_memory(base_dir, adapter_dir)
        on_status(f"writing GGUF ({quant.upper()})")
        tensors = export_gguf.write_gguf(
            model,
            tokenizer,
            base_dir,
            staging / export_gguf.GGUF_FILE,
            quant,
            name=f"{checkpoint.base_model} checkpoint {checkpoint.id}",
        )
        del model
        _free()
        add_bos = export_gguf.tokenizer_adds_bos(tokenizer)
        modelfile = export_gguf.render_modelfile(
            tokenizer,
            frame,
            add_bos=add_bos,
            max_new_tokens=max_new,
            num_ctx=settings.eval_max_model_len,
        )
        (staging / export_gguf.MODELFILE).write_text(modelfile, encoding="utf-8")
        on_status(f"verifying the GGUF on {len(prompts)} eval prompts")
        verification = verify_gguf(
            base_dir, adapter_dir, staging, prompts, labels, gold, max_new, quant=quant
        )
        size = (staging / export_gguf.GGUF_FILE).stat().st_size
        (staging / "README.md").write_text(
            export_gguf.export_readme(checkpoint.id or 0, quant, size), encoding="utf-8"
        )
        report = {
            "checkpoint_id": checkpoint.id,
            "job_id": checkpoint.job_id,
            "base_model": checkpoint.base_model,
            "protocol_version": PROTOCOL_VERSION,
            "labels": checkpoint.meta.get("labels"),
            "prompt_frame": frame.to_dict(),
            "eval": _eval_scores(session, checkpoint),
            "export": {
                "bits": None,
                "format": "gguf",
                "quant": quant,
                "tensor_types": tensors,
                "file": export_gguf.GGUF_FILE,
                "seconds": round(time.perf_counter() - started, 2),
            },
            "verification": verification,
            "path": name,
            "bytes": sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()),
        }
        (staging / "meta.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    return report


def verify_gguf(
    base_dir: Path,
    adapter_dir: Path,
    export_dir: Path,
    prompts: Sequence[list[int]],
    labels: Sequence[str],
    gold: Sequence[str | None],
    max_new: int,
    *,
    quant: str,
) -> dict[str, Any]:
    """Greedy answers of the GGUF read back fresh (transformers dequantizes it; the tokenizer is
    the file's) against base + adapter in float32. F16 must give the same label on every
    prompt (else the export fails); every type reports identical answers, label agreement and
    accuracy. Where llama-cpp-python is installed, llama.cpp answers too."""
    import torch

    from runner import export_gguf
    from runner.eval.predict import TransformersPredictor

    fp32 = torch.float32
    reference = _answers(TransformersPredictor(base_dir, adapter_dir, dtype=fp32), prompts, max_new)
    n = max(len(prompts), 1)

    def scores(answers: Sequence[str]) -> dict[str, Any]:
        ours = [_label(a, labels) for a in answers]
        theirs = [_label(b, labels) for b in reference]
        return {
            "identical_answers": sum(a == b for a, b in zip(answers, reference, strict=True)),
            "answer_agreement": round(
                sum(a == b for a, b in zip(answers, reference, strict=True)) / n, 4
            ),
            "label_agreement": round(sum(a == b for a, b in zip(ours, theirs, strict=True)) / n, 4),
            "accuracy": round(sum(a == g for a, g in zip(ours, gold, strict=True)) / n, 4),
        }

    result: dict[str, Any] = {
        "samples": len(prompts),
        "max_new_tokens": max_new,
        "same_labels_required": quant == "f16",
        "adapter_accuracy": round(
            sum(_label(b, labels) == g for b, g in zip(reference, gold, strict=True)) / n, 4
        ),
    }
    gguf = TransformersPredictor(export_dir, None, dtype=fp32, gguf_file=export_gguf.GGUF_FILE)
    result["transformers"] = scores(_answers(gguf, prompts, max_new))
    if importlib.util.find_spec("llama_cpp") is not None:
        try:
            path = export_dir / export_gguf.GGUF_FILE
            result["llama_cpp"] = scores(export_gguf.llama_cpp_answers(path, prompts, max_new))
        except Exception as exc:  # an optional local build: its failure is reported, not fatal
            log.warning("the export's llama.cpp check failed: %s", exc)
            result["llama_cpp_note"] = f"llama-cpp-python could not answer: {exc}"
    if quant == "f16" and result["transformers"]["label_agreement"] != 1:
        differ = round((1 - result["transformers"]["label_agreement"]) * len(prompts))
        raise ExportFailed(
            f"verification failed: the F16 GGUF gave {differ} of {len(prompts)} eval prompts a "
            "different label from base + adapter; nothing was published"
        )
    return result


def _merged_in_memory(base_dir: Path, adapter_dir: Path) -> Any:
    """Base + adapter merged, in the base's dtype, on the CPU (the GGUF writer reads numpy)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    dtype = getattr(config, "dtype", None) or torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)  # type: ignore[arg-type]
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()  # type: ignore[arg-type]


def merge_adapter(base_dir: Path, adapter_dir: Path, out: Path, shard_size: str) -> bool:
    """Merge and save; True when the merged weights are float32 (exactly comparable)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    # The base's own dtype (what gets deployed); float32 where that is what the base is.
    dtype = getattr(config, "dtype", None) or torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(device)  # type: ignore[arg-type]
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), max_shard_size=shard_size)
    del model
    _free()
    return dtype == torch.float32


def _quantize(merged_dir: Path, out: Path, bits: int, shard_size: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(merged_dir), quantization_config=quantization, device_map={"": 0}
    )
    model.save_pretrained(str(out), max_shard_size=shard_size)
    del model
    _free()


def save_tokenizer(base_dir: Path, out: Path) -> None:
    """The base tokenizer, whose chat template rendered every training sample (the shared
    protocol renders through it); checked to render the same prompt after the round trip."""
    tokenizer = load_tokenizer(base_dir)
    tokenizer.save_pretrained(str(out))
    probe = [Message("user", "新闻标题：导出检查")]
    if render_prompt(load_tokenizer(out), probe) != render_prompt(tokenizer, probe):
        raise ExportFailed("the saved tokenizer renders prompts differently from training")


def verify(
    base_dir: Path,
    adapter_dir: Path,
    export_dir: Path,
    prompts: Sequence[list[int]],
    labels: Sequence[str],
    max_new: int,
    *,
    exact: bool,
    with_vllm: bool = True,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Greedy answers of the fresh export against base + adapter on ``prompts``. ``exact``: a
    float32 merge, which must answer identically (else the export fails); otherwise (bf16 merges,
    quantized copies) the agreement is measured and reported. The vLLM check takes the engine
    arguments evaluation takes (``settings``); when vLLM cannot start with its share it is
    skipped and ``vllm_note`` says why."""
    import torch

    from runner.eval.predict import (
        TransformersPredictor,
        VllmPredictor,
        VllmUnavailable,
        vllm_available,
    )
    from runner.vllm_args import Purpose

    # float32 on every device: a bf16 merge rounds differently from bf16 base + adapter, and the
    # merged export must answer exactly as the adapter does.
    fp32 = torch.float32
    reference = _answers(TransformersPredictor(base_dir, adapter_dir, dtype=fp32), prompts, max_new)
    result: dict[str, Any] = {
        "samples": len(prompts),
        "max_new_tokens": max_new,
        "exact_required": exact,
    }
    backends: list[tuple[str, Callable[[], Any]]] = [
        ("transformers", lambda: TransformersPredictor(export_dir, None, dtype=fp32))
    ]
    if with_vllm and vllm_available():
        backends.append(
            ("vllm", lambda: VllmPredictor(export_dir, None, settings, purpose=Purpose.export))
        )
    for backend, make in backends:
        try:
            answers = _answers(make(), prompts, max_new)
        except VllmUnavailable as exc:  # raised at engine start; the transformers check stands
            log.warning("the export's vLLM check is skipped: %s", exc.message)
            result["vllm_note"] = exc.message
            _free()
            continue
        same = sum(a == b for a, b in zip(answers, reference, strict=True))
        agree = sum(
            _label(a, labels) == _label(b, labels) for a, b in zip(answers, reference, strict=True)
        )
        result[backend] = {
            "identical_answers": same,
            "answer_agreement": round(same / max(len(prompts), 1), 4),
            "label_agreement": round(agree / max(len(prompts), 1), 4),
        }
    if exact and result["transformers"]["identical_answers"] != len(prompts):
        differ = len(prompts) - result["transformers"]["identical_answers"]
        raise ExportFailed(
            f"verification failed: the merged export answered {differ} of {len(prompts)} eval "
            "prompts differently from base + adapter; nothing was published"
        )
    return result


def _answers(predictor: Any, prompts: Sequence[list[int]], max_new: int) -> list[str]:
    try:
        return [g.text for g in predictor.generate(prompts, max_new)]
    finally:
        del predictor
        _free()


def _label(text: str, labels: Sequence[str]) -> str | None:
    from core.protocol import match_label

    return match_label(parse_answer(text).label, labels)


def _eval_scores(session: Session, checkpoint: Checkpoint) -> dict[str, Any] | None:
    job = session.get(Job, checkpoint.job_id)
    if job is None or job.dataset_id is None or checkpoint.id is None:
        return None
    evaluation = latest_evaluation(
        session,
        dataset_id=job.dataset_id,
        base_model=checkpoint.base_model,
        checkpoint_id=checkpoint.id,
    )
    if evaluation is None:
        return None
    keys = ("accuracy", "macro_f1", "invalid_rate", "predict_rouge-1", "predict_bleu-4")
    return {key: evaluation.metrics.get(key) for key in keys}


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
