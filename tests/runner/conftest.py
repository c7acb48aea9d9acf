"""Fixtures for evaluation tests: a learnable dataset with an eval split, and training a job."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import select

from core.enums import JobStatus
from core.settings import Settings
from runner.datasets.ingest import IngestOptions, ingest_dataset
from runner.job import run_job
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import claim_next_job, create_job
from storage.models import Checkpoint, Dataset, Job
from tests.runner import dataset_files as files
from tests.runner.train_helpers import synthetic

TRAIN = {
    "learning_rate": 3e-3,
    "num_train_epochs": 8,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lora_rank": 16,
    "logging_steps": 10,
}


@pytest.fixture
def eval_settings(settings: Settings, tiny_model_dir: Path) -> Settings:
    return settings.model_copy(
        update={"base_model": str(tiny_model_dir), "eval_backend": "transformers"}
    )


def ingest_synthetic(
    engine, settings: Settings, folder: Path, *, name: str, train: list, eval: list | None = None
) -> Dataset:
    """``train`` (and ``eval``) conversations as ShareGPT files under ``folder``, ingested as the
    deployment's dataset ``name``."""

    def records(conversations):
        return [
            {
                "conversations": [
                    {"from": "human", "value": c[0].content},
                    {"from": "gpt", "value": c[1].content},
                ]
            }
            for c in conversations
        ]

    folder.mkdir()
    files.write_json(folder / "train.json", records(train))
    if eval is not None:
        files.write_json(folder / "eval.json", records(eval))
    with new_session(engine) as session:
        stored, _ = ingest_dataset(
            session,
            ArtifactStore(settings.artifact_dir),
            folder,
            IngestOptions.from_settings(settings),
            name=name,
            tokenizer=None,
        )
    return stored


@pytest.fixture
def dataset(engine, eval_settings: Settings, tmp_path: Path) -> Dataset:
    return ingest_synthetic(
        engine,
        eval_settings,
        tmp_path / "upload",
        name="syn",
        train=synthetic(24),
        eval=synthetic(5, seed=1),
    )


def train_job(engine, settings: Settings, dataset: Dataset, config: dict | None = None) -> Job:
    with new_session(engine) as session:
        job = create_job(
            session, base_model=settings.base_model, dataset_id=dataset.id, config=config or TRAIN
        )
        token = claim_next_job(session, owner="inline", lease_seconds=60).lease_token
    run_job(job.id, token, settings)
    with new_session(engine) as session:
        return session.get(Job, job.id)


@pytest.fixture
def checkpoint(engine, eval_settings: Settings, dataset: Dataset) -> Checkpoint:
    """The final checkpoint of a training job on ``dataset`` (trained, and evaluated, for real)."""
    job = train_job(engine, eval_settings, dataset)
    assert job.status == JobStatus.succeeded, job.error
    with new_session(engine) as session:
        return session.exec(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.final)
        ).one()
