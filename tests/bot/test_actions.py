"""Approve & promote / Reject: approvers only, against a real serving app (transformers backend),
one decision per checkpoint, every decision audited."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from sqlmodel import select

from bot.standin import block_action_body
from core.enums import CheckpointStatus
from core.settings import Settings
from serving.app import create_app as create_serving_app
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.models import AuditLog, Checkpoint, Job, Promotion
from tests.bot.conftest import APPROVER, GROUP_MEMBER
from tests.serving.conftest import adapter_checkpoints

KEY = "serving-key-for-bot-tests"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serving_port() -> int:
    return _port()


@pytest.fixture
def bot_extra_settings(serving_port: int) -> dict:
    return {"serving_url": f"http://127.0.0.1:{serving_port}", "serving_api_key": KEY}


@pytest.fixture
def checkpoints(slack, engine, tiny_model_dir: Path) -> dict[str, int]:
    meta = {
        "protocol_version": 1,
        "base_model": str(tiny_model_dir),
        "adapter": True,
        "labels": ["体育", "财经"],
        "prompt_frame": {"prefix": "标题："},
    }
    return adapter_checkpoints(
        engine,
        ArtifactStore(slack.settings.artifact_dir),
        tiny_model_dir,
        {"good": ("体育", 8, meta), "meh": ("财经", 8, meta)},
    )


@pytest.fixture
def serving(slack, checkpoints, tiny_model_dir: Path, serving_port: int) -> Iterator[str]:
    settings = Settings(
        _env_file=None,
        database_url=slack.settings.database_url,
        artifact_dir=slack.settings.artifact_dir,
        base_model=str(tiny_model_dir),
        serving_api_key=KEY,
        serving_backend="transformers",
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_serving_app(settings), host="127.0.0.1", port=serving_port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{serving_port}"
    server.should_exit = True
    thread.join(15)


def _click(slack, action: str, checkpoint_id: int, user: str) -> None:
    body = block_action_body(action, str(checkpoint_id), user_id=user, message_ts="9.0")
    assert slack.post(body).status_code == 200


def _status(engine, checkpoint_id: int) -> Checkpoint:
    with new_session(engine) as session:
        return session.get(Checkpoint, checkpoint_id)


def test_only_approvers_decide_and_a_double_click_does_nothing_more(
    slack,
    engine,
    checkpoints,
    serving,
) -> None:
    good, meh = checkpoints["good"], checkpoints["meh"]
    _click(slack, "approve_checkpoint", good, "U0STRANGER")
    refusal = slack.standin.wait_for("chat.postEphemeral")[0]
    assert refusal["user"] == "U0STRANGER" and "Only approvers" in refusal["text"]
    assert _status(engine, good).status == CheckpointStatus.candidate

    _click(slack, "approve_checkpoint", good, APPROVER)
    [update] = slack.standin.wait_for("chat.update")
    assert update["ts"] == "9.0" and "Approved and promoted by <@U0APPROVER>" in update["text"]
    assert all(b["type"] != "actions" for b in update["blocks"])  # the buttons are gone
    promoted = _status(engine, good)
    assert promoted.status == CheckpointStatus.promoted and promoted.decided_by == APPROVER

    _click(slack, "approve_checkpoint", good, APPROVER)  # a double click
    again = slack.standin.wait_for("chat.postEphemeral", 2)[1]
    assert "already promoted by <@U0APPROVER>" in again["text"]
    assert len(slack.standin.calls_to("chat.update")) == 1

    _click(slack, "reject_checkpoint", meh, GROUP_MEMBER)  # an approver through the group
    slack.standin.wait_for("chat.update", 2)
    assert _status(engine, meh).status == CheckpointStatus.rejected
    with new_session(engine) as session:
        promotions = session.exec(select(Promotion)).all()
        audit = [(a.actor, a.action) for a in session.exec(select(AuditLog)).all()]
    assert [(p.checkpoint_id, p.decided_by) for p in promotions] == [(good, APPROVER)]
    assert audit == [(APPROVER, "promote"), (GROUP_MEMBER, "reject")]


def test_the_promoted_checkpoint_answers_through_serving(
    slack,
    engine,
    checkpoints,
    serving,
) -> None:
    import httpx

    _click(slack, "approve_checkpoint", checkpoints["good"], APPROVER)
    slack.standin.wait_for("chat.update")
    answer = httpx.post(
        f"{serving}/v1/classify",
        json={"text": "球队夺冠"},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ).json()
    assert answer["label"] == "体育"
    assert answer["model"]["checkpoint_id"] == checkpoints["good"]


def test_classify_promote_rollback_and_compare_commands(
    slack,
    engine,
    checkpoints,
    serving,
) -> None:
    from storage.models import Evaluation

    good = checkpoints["good"]
    slack.command(f"promote {good}", user="U0STRANGER")
    assert "only approvers can promote a checkpoint" in slack.reply(0)["text"]
    slack.command(f"promote {good}", user=APPROVER)
    promoted = slack.reply(1)
    assert promoted["response_type"] == "in_channel"
    assert f"<@{APPROVER}> promoted checkpoint {good}" in promoted["text"]

    slack.command("球队夺冠", command="/classify")
    answer = slack.reply(2)
    assert answer["response_type"] == "in_channel"
    assert answer["blocks"][0]["text"]["text"].startswith("*体育*  ←  球队夺冠")
    assert f"answered by checkpoint {good}" in answer["blocks"][1]["elements"][0]["text"]
    slack.command("--model base 球队夺冠", command="/classify")
    assert "answered by the base model" in slack.reply(3)["blocks"][1]["elements"][0]["text"]
    slack.command("", command="/classify")
    assert "What should I classify?" in slack.reply(4)["text"]

    slack.command("rollback", user=GROUP_MEMBER)
    assert "the base model answers `/classify` now" in slack.reply(5)["text"]

    with new_session(engine) as session:
        job = session.get(Checkpoint, good).job_id
        session.get(Job, job).dataset_id = None
        session.add(
            Evaluation(
                checkpoint_id=good,
                dataset_id=_any_dataset(session, slack.settings.artifact_dir),
                base_model="x",
                metrics={"accuracy": 0.9, "macro_f1": 0.85, "predict_rouge-1": 50.0},
            )
        )
        session.commit()
    slack.command(f"compare {good} {checkpoints['meh']}")
    assert "has no evaluation yet" in slack.reply(6)["text"]
    slack.command(f"compare {good} {good}")
    table = slack.reply(7)["text"]
    assert "accuracy" in table and "90.0%" in table and "50.00" in table


def _any_dataset(session, artifact_dir: Path) -> int:
    from runner.datasets.ingest import IngestOptions, ingest_dataset
    from tests.conftest import DEMO_DATASET

    dataset, _ = ingest_dataset(
        session,
        ArtifactStore(artifact_dir),
        DEMO_DATASET,
        IngestOptions.from_settings(Settings(_env_file=None)),
        name="cmp",
        tokenizer=None,
    )
    return dataset.id
