"""Export on the tiny model: a merged standalone model that answers exactly as base + adapter,
published only once verified; refusals; the disk check; a killed export leaves no final directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from core.enums import JobKind, JobStatus
from core.errors import ConfigError, Conflict, NotFound
from core.protocol import render_prompt
from runner.datasets.ingest import read_split
from runner.eval.predict import TransformersPredictor, vllm_available
from runner.export import export_checkpoint, export_name, quantization_unavailable
from runner.job import run_job
from runner.models import load_tokenizer
from stack.processes import process_env
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import claim_next_job, create_job, job_events
from storage.models import Checkpoint, Job
from storage.promotions import reject_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _export_job(engine, settings, checkpoint: Checkpoint, **config) -> Job:
    with new_session(engine) as session:
        job = create_job(
            session,
            kind=JobKind.export,
            base_model=checkpoint.base_model,
            config={"checkpoint_id": checkpoint.id, **config},
        )
        token = claim_next_job(session, owner="inline", lease_seconds=60).lease_token
    run_job(job.id, token, settings)
    with new_session(engine) as session:
        return session.get(Job, job.id)


def test_a_merged_export_answers_exactly_as_base_plus_adapter(
    engine, eval_settings, dataset, checkpoint
) -> None:
    job = _export_job(engine, eval_settings, checkpoint, shard_size="1MB")
    assert job.status == JobStatus.succeeded, job.error
    with new_session(engine) as session:
        events = job_events(session, job_id=job.id)
    exported = next(e.payload for e in events if e.kind == "exported")
    assert [e.kind for e in events if e.kind == "status"] == ["status"] * 2
    store = ArtifactStore(eval_settings.artifact_dir)
    out = store.path(export_name(checkpoint.id, None))
    assert exported["path"] == export_name(checkpoint.id, None)
    assert exported["absolute_path"] == str(out)

    # A standalone model: sharded safetensors (1MB shards), the tokenizer, meta.json; no adapter.
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").exists()
    assert not (out / "adapter_config.json").exists()
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["checkpoint_id"] == checkpoint.id and meta["base_model"] == checkpoint.base_model
    assert meta["labels"] == dataset.labels and meta["eval"]["accuracy"] is not None
    assert meta["export"]["bits"] is None and meta["export"]["shard_size"] == "1MB"
    assert (
        meta["bytes"]
        == exported["bytes"]
        == sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.name != "meta.json")
    )
    verification = meta["verification"]
    assert verification == exported["verification"]
    assert (
        verification["transformers"]["identical_answers"]
        == verification["samples"]
        == dataset.eval_samples
    )
    if vllm_available():  # the export loads in vLLM as well, and answers the same
        assert verification["vllm"]["identical_answers"] == dataset.eval_samples

    # Independently of the export's own check: fresh load, greedy, the same answers.
    tokenizer = load_tokenizer(out)
    base_tokenizer = load_tokenizer(Path(eval_settings.base_model))
    history = read_split(store, dataset.eval_sha256)
    prompts = [render_prompt(tokenizer, c[:-1]) for c in history]
    assert prompts == [render_prompt(base_tokenizer, c[:-1]) for c in history]  # same template
    merged = TransformersPredictor(out, None).generate(prompts, 24)
    adapter = TransformersPredictor(
        Path(eval_settings.base_model), store.path(checkpoint.path)
    ).generate(prompts, 24)
    assert [g.text for g in merged] == [g.text for g in adapter]
    assert any(g.text for g in merged)


def test_an_evaluation_with_the_adapter_merged_answers_as_base_plus_adapter(
    eval_settings, dataset, checkpoint
) -> None:
    """EVAL_MERGE_ADAPTER (auto: on GPUs) folds the adapter into the predictor's own copy: no LoRA
    layer is left, the answers are those of base + adapter, and the base on disk is untouched."""
    store = ArtifactStore(eval_settings.artifact_dir)
    base = Path(eval_settings.base_model)
    tokenizer = load_tokenizer(base)
    prompts = [render_prompt(tokenizer, c[:-1]) for c in read_split(store, dataset.eval_sha256)]
    adapter_dir = store.path(checkpoint.path)
    auto = TransformersPredictor(base, adapter_dir)  # auto on CPU: not merged
    merged = TransformersPredictor(base, adapter_dir, merge_adapter=True)
    assert not auto.merged and merged.merged
    assert not any("lora" in name for name, _ in merged.model.named_modules())
    assert any("lora" in name for name, _ in auto.model.named_modules())
    answers = [g.text for g in merged.generate(prompts, 24)]
    assert answers == [g.text for g in auto.generate(prompts, 24)]
    plain = TransformersPredictor(base, None).generate(prompts, 24)
    assert answers != [g.text for g in plain]  # the adapter changed the answers: it was applied


def test_exports_that_cannot_be_made_are_refused_before_anything_is_written(
    engine, eval_settings, checkpoint, monkeypatch
) -> None:
    store = ArtifactStore(eval_settings.artifact_dir)

    def export(checkpoint_id: int, bits: int | None = None) -> None:
        with new_session(engine) as session:
            export_checkpoint(session, store, eval_settings, checkpoint_id=checkpoint_id, bits=bits)

    with pytest.raises(NotFound, match="there is no checkpoint 999"):
        export(999)
    with pytest.raises(ConfigError, match="bits=3 is not allowed: use 8 or 4"):
        export(checkpoint.id, bits=3)
    reason = quantization_unavailable()
    if reason is not None:  # this machine (CI: no GPU, no bitsandbytes) cannot quantize
        with pytest.raises(ConfigError, match="bits=4 cannot be exported here: "):
            export(checkpoint.id, bits=4)

    # Not enough disk: refused with both figures, before anything is written.
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(
        "runner.export.shutil.disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000)
    )
    with pytest.raises(Exception, match=r"not enough disk for the export: it needs about") as exc:
        export(checkpoint.id)
    assert "0.00 GB are free under ARTIFACT_DIR" in str(exc.value)
    assert not store.path("exports").exists() and not any(store.tmp.iterdir())
    monkeypatch.undo()

    with new_session(engine) as session:
        reject_checkpoint(session, checkpoint_id=checkpoint.id, decided_by="U_APPROVER")
    with pytest.raises(Conflict, match="was rejected by U_APPROVER"):
        export(checkpoint.id)
    assert not store.path("exports").exists()


def test_an_export_already_made_is_not_overwritten(engine, eval_settings, checkpoint) -> None:
    store = ArtifactStore(eval_settings.artifact_dir)
    store.path(export_name(checkpoint.id, None)).mkdir(parents=True)
    job = _export_job(engine, eval_settings, checkpoint)
    assert job.status == JobStatus.failed
    assert "is already exported at exports/checkpoint-" in job.error
    assert "delete that directory to export it again" in job.error


def test_a_killed_export_leaves_nothing_under_its_final_name(
    engine, eval_settings, checkpoint
) -> None:
    store = ArtifactStore(eval_settings.artifact_dir)
    env = {**process_env(eval_settings), "EVAL_BACKEND": "transformers"}
    process = subprocess.Popen(
        [sys.executable, "-m", "runner", "export", str(checkpoint.id), "--shard-size", "1MB"],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(store.tmp.glob("*/model-*.safetensors")):  # mid-export: shards written
            assert process.poll() is None, "the export ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not store.path(export_name(checkpoint.id, None)).exists()
    assert store.sweep_tmp() >= 1  # what it left is only under tmp/, and the sweep removes it
    assert not any(store.tmp.iterdir())


def test_an_export_finished_meanwhile_by_another_job_is_a_conflict_not_a_crash(
    engine, eval_settings, checkpoint, monkeypatch
) -> None:
    import runner.export as export

    store = ArtifactStore(eval_settings.artifact_dir)
    final = store.path(export_name(checkpoint.id, None))
    save_tokenizer = export.save_tokenizer

    def another_job_finishes_first(base_dir, out):
        final.mkdir(parents=True)
        (final / "meta.json").write_text("{}")
        save_tokenizer(base_dir, out)

    monkeypatch.setattr(export, "save_tokenizer", another_job_finishes_first)
    with new_session(engine) as session, pytest.raises(Conflict, match="by another job meanwhile"):
        export_checkpoint(session, store, eval_settings, checkpoint_id=checkpoint.id)
    assert [p.name for p in final.iterdir()] == ["meta.json"]  # the other export is untouched
    assert not any(store.tmp.iterdir())  # ours was cleaned up


@pytest.mark.slow
def test_the_vllm_check_is_skipped_with_the_reason_when_vllm_cannot_start(
    tiny_model_dir, tokenizer
) -> None:
    from core.protocol import Message
    from core.settings import Settings
    from runner.export import verify

    prompts = [render_prompt(tokenizer, [Message("user", f"标题：消息{i}")]) for i in range(3)]
    starved = Settings(_env_file=None, eval_cpu_kv_cache_mib=1)  # no room for one sequence
    result = verify(
        tiny_model_dir, None, tiny_model_dir, prompts, [], 8, exact=True, settings=starved
    )
    assert result["transformers"]["identical_answers"] == 3  # the required check still ran
    assert "vllm" not in result
    assert result["vllm_note"].startswith(
        "vLLM could not start for export verification with its memory (CPU, KV cache 1 MiB): "
        "To serve at least one request"
    )
