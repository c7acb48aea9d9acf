"""The warm worker (``RUNNER_WARM_WORKER``): jobs run one after another in one process that keeps
the base model resident, and each trains exactly as it would in a fresh process — a fresh
adapter, optimizer and RNG per job. Two different jobs back to back in one warm worker give
bit-identical adapters (and evaluations) to the same jobs each run in its own process."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file
from sqlmodel import select

from core.enums import JobStatus
from runner.worker import Runner
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import create_job, job_events
from storage.models import Checkpoint, Job
from tests.runner.conftest import TRAIN

JOBS = (  # short: isolation shows from the first steps (CI time)
    {**TRAIN, "num_train_epochs": 1},
    {**TRAIN, "num_train_epochs": 1, "seed": 7, "learning_rate": 5e-3, "lora_rank": 8},
)


@pytest.fixture
def db_url(tmp_path: Path) -> str:  # processes and files, nothing database-specific: SQLite
    return f"sqlite:///{tmp_path / 'test.db'}"


def _run(engine, settings, dataset, caplog) -> list[int]:
    with new_session(engine) as session:
        ids = [
            create_job(
                session, base_model=settings.base_model, dataset_id=dataset.id, config=config
            ).id
            for config in JOBS
        ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runner.worker"):
        Runner(settings, owner="test", devices=[None]).run(once=True)
    with new_session(engine) as session:
        for job_id in ids:
            job = session.get(Job, job_id)
            assert job.status == JobStatus.succeeded, job.error
    return ids


def _pids(caplog, ids: list[int]) -> list[str]:
    started = {
        int(m.group(1)): m.group(2)
        for r in caplog.records
        if (m := re.match(r"job (\d+) started on \S+ \(pid (\d+)\)", r.getMessage()))
    }
    return [started[i] for i in ids]


def _adapter(engine, store: ArtifactStore, job_id: int) -> dict:
    with new_session(engine) as session:
        final = session.exec(
            select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.final)
        ).one()
    return load_file(str(store.path(final.path) / "adapter_model.safetensors"))


def _evaluated(engine, job_id: int) -> dict:
    with new_session(engine) as session:
        return next(e.payload for e in job_events(session, job_id=job_id) if e.kind == "evaluated")


@pytest.mark.slow
def test_jobs_in_one_warm_worker_train_as_they_would_in_fresh_processes(
    engine, eval_settings, dataset, caplog
) -> None:
    store = ArtifactStore(eval_settings.artifact_dir)
    warm = _run(
        engine, eval_settings.model_copy(update={"runner_warm_worker": "on"}), dataset, caplog
    )
    pids = _pids(caplog, warm)
    assert pids[0] == pids[1]  # one process ran both: the base was not loaded again
    fresh = _run(
        engine, eval_settings.model_copy(update={"runner_warm_worker": "off"}), dataset, caplog
    )
    pids = _pids(caplog, fresh)
    assert pids[0] != pids[1]  # a process per job

    for warm_id, fresh_id in zip(warm, fresh, strict=True):
        ours, theirs = _adapter(engine, store, warm_id), _adapter(engine, store, fresh_id)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert ours[name].equal(theirs[name]), name
        a, b = _evaluated(engine, warm_id), _evaluated(engine, fresh_id)
        for key in ("accuracy", "macro_f1", "ece", "predict_rouge-1"):
            assert a[key] == b[key], key
    # The two jobs differ (seed, rank, lr): the second did not inherit the first's adapter.
    first, second = _adapter(engine, store, warm[0]), _adapter(engine, store, warm[1])
    assert any(first[k].shape != second[k].shape or not first[k].equal(second[k]) for k in first)


def test_pinning_the_resident_base_keeps_its_values_and_tied_weights(tiny_model_dir) -> None:
    """``pin_tensors`` swaps every tensor's storage once (a CUDA host pins it; here a copy stands
    for the page-locked one): tied weights stay one tensor, values and device copies unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    from runner import warm

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    pointers = {name: t.data_ptr() for name, t in model.state_dict().items()}
    swapped: list[int] = []

    def pin(tensor: torch.Tensor) -> torch.Tensor:
        swapped.append(id(tensor))
        return tensor.clone()

    warm.pin_tensors(model, pin)
    after = model.state_dict()
    assert len(swapped) == len(warm._tensors(model))  # each shared tensor once
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]), name
        assert tensor.data_ptr() != pointers[name], name  # the storage moved
    copied = warm.device_copy(model, "cpu").state_dict()
    assert all(torch.equal(copied[name], before[name]) for name in before)
