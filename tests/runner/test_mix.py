"""``mix=DATASET:SHARE`` (issue 17 item 3's remedy for forgetting): a share of another dataset's
train samples joins the task's, drawn in an order fixed by the seed; every bad mix is refused
before a job is queued, and by the runner when a job names one anyway."""

from __future__ import annotations

import pytest
from sqlmodel import select

from core.enums import JobStatus
from core.errors import ConfigError, NotFound
from runner.config import parse_train_args
from runner.datasets.ingest import IngestOptions
from runner.eval.benchmark import ingest_benchmark
from storage.artifacts import ArtifactStore
from storage.datasets import mix_dataset
from storage.db import new_session
from storage.jobs import job_events
from storage.models import Checkpoint
from tests.runner.conftest import TRAIN, ingest_synthetic, train_job
from tests.runner.test_benchmark import ceval_files, write
from tests.runner.train_helpers import synthetic


def _general(engine, settings, tmp_path, samples: int) -> None:
    ingest_synthetic(
        engine, settings, tmp_path / "general", name="general", train=synthetic(samples, seed=9)
    )


@pytest.mark.parametrize(
    "db_url", ["sqlite"], indirect=True
)  # CI time: the lookups run on both below
def test_a_job_trains_on_its_samples_and_a_share_of_the_mixed_dataset(
    engine, eval_settings, dataset, tmp_path
) -> None:
    _general(engine, eval_settings, tmp_path, samples=5)  # 20, fewer than asked for: repeated
    job = train_job(
        engine, eval_settings, dataset, {**TRAIN, "num_train_epochs": 1, "mix": "general:0.5"}
    )
    assert job.status == JobStatus.succeeded, job.error
    with new_session(engine) as session:
        events = job_events(session, job_id=job.id)
        final = session.exec(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.final)
        ).one()
    started = next(e.payload for e in events if e.kind == "started")
    assert started["samples"] == 96 + 48  # the task's 96 and half as many from general
    mix = final.meta["mix"]
    assert mix["dataset"]["name"] == "general" and mix["share"] == 0.5
    assert mix["samples"] == 48 and mix["task_samples"] == 96
    assert final.meta["labels"] == dataset.labels  # the task's labels, not the mix's
    assert any(
        e.kind == "status" and e.payload["message"].startswith("mixing in 48 samples of general v1")
        for e in events
    )

    # A job whose mix names nothing it may use fails, saying so (queued around the checks).
    missing = train_job(engine, eval_settings, dataset, {**TRAIN, "mix": "nowhere:0.2"})
    assert missing.status == JobStatus.failed
    assert "mix: no dataset named nowhere" in missing.error


def test_bad_mixes_are_refused_before_anything_is_queued(engine, settings, tmp_path) -> None:
    with pytest.raises(ConfigError, match="mix=general is not DATASET:SHARE"):
        parse_train_args(["mix=general"])
    with pytest.raises(ConfigError, match="SHARE above 0 and at most 1"):
        parse_train_args(["mix=general:1.5"])
    with new_session(engine) as session:
        ingest_benchmark(
            session,
            ArtifactStore(settings.artifact_dir),
            write(tmp_path / "ceval-mini", ceval_files()),
            IngestOptions.from_settings(settings).limits,
            name="exam",
        )
        with pytest.raises(ConfigError, match="dataset exam is a benchmark dataset, not training"):
            mix_dataset(session, name="exam", channel_id="C1")
        with pytest.raises(NotFound, match="mix: no dataset named general that this channel"):
            mix_dataset(session, name="general", channel_id="C1")
