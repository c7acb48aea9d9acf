"""Approve & promote / Reject: approvers only, against a real serving app (transformers backend),
one decision per checkpoint, every decision audited."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from slack_sdk import WebClient
from sqlmodel import select

from bot.standin import block_action_body
from core.enums import CheckpointStatus
from core.settings import Settings
from serving.app import create_app as create_serving_app
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import add_job_event
from storage.models import AuditLog, Checkpoint, Job, Promotion
from storage.types import utcnow
from tests.bot.conftest import APPROVER, GROUP_MEMBER, ingest
from tests.serving.conftest import AdapterCache, adapter_checkpoints

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


@pytest.fixture(scope="session")
def adapter_cache(tmp_path_factory: pytest.TempPathFactory) -> AdapterCache:
    """The two adapters below are trained once per session, not once per test."""
    return AdapterCache(tmp_path_factory.mktemp("bot-adapters"))


@pytest.fixture
def checkpoints(slack, engine, tiny_model_dir: Path, adapter_cache: AdapterCache) -> dict[str, int]:
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
        adapter_cache,
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


def test_an_approver_promotes_from_the_app_home_and_a_stranger_is_refused(
    slack,
    engine,
    checkpoints,
    serving,
) -> None:
    from bot.standin import home_action_body
    from storage.models import Evaluation

    good = checkpoints["good"]
    dataset = ingest(slack, engine, channel="C0CHAN")
    with new_session(engine) as session:  # the home offers Promote on evaluated candidates
        job = session.get(Job, session.get(Checkpoint, good).job_id)
        session.add(
            Evaluation(
                checkpoint_id=good,
                dataset_id=dataset.id,
                base_model=job.base_model,
                metrics={"accuracy": 0.9, "macro_f1": 0.9},
            )
        )
        session.commit()

    def click(user: str) -> dict:
        before = len(slack.standin.calls_to("views.publish"))
        assert slack.post(home_action_body("approve_checkpoint", str(good), user_id=user))
        published = slack.standin.wait_for("views.publish", before + 1)[before]
        assert published["user_id"] == user
        return published["view"]

    refused = click("U0STRANGER")
    assert "Only approvers can promote" in refused["blocks"][0]["text"]["text"]
    assert _status(engine, good).status == CheckpointStatus.candidate
    done = click(APPROVER)
    assert done["blocks"][0]["text"]["text"].startswith(
        f":white_check_mark: You promoted checkpoint {good} at "
    )
    assert done["blocks"][1]["text"]["text"].startswith(f"*Serving now:* checkpoint {good} · ")
    assert _status(engine, good).status == CheckpointStatus.promoted
    assert not slack.standin.calls_to("chat.update")  # no message was clicked
    with new_session(engine) as session:
        promotions = session.exec(select(Promotion)).all()
    assert [(p.checkpoint_id, p.decided_by) for p in promotions] == [(good, APPROVER)]


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
    with new_session(engine) as session:  # a report of it was posted in its job's thread once
        job = session.get(Job, session.get(Checkpoint, good).job_id)
        job.channel_id = "C0CHAN"
        session.add(job)
        session.commit()
        client = WebClient(token=slack.standin.bot_token, base_url=slack.settings.slack_api_url)
        report = client.chat_postMessage(channel="C0CHAN", text="a report", thread_ts="5.0")["ts"]
        event = add_job_event(session, job_id=job.id, kind="evaluated", checkpoint_id=good)
        event.payload = {**event.payload, "_report_ts": report}
        event.delivered_at = utcnow()
        session.add(event)
        session.commit()
    slack.command(f"promote {good} force", user=APPROVER)  # never evaluated: forced
    promoted = slack.reply(1)
    assert promoted["response_type"] == "in_channel"
    assert promoted["text"].startswith(
        f":white_check_mark: <@{APPROVER}> promoted checkpoint {good} (forced: checkpoint "
        f"{good} was never evaluated (its job 1 succeeded)): `/classify` now answers with it"
    )
    link = f"https://standin.slack.com/archives/C0CHAN/p{report.replace('.', '')}"
    assert promoted["text"].endswith(f" <{link}?thread_ts=5.0&cid=C0CHAN|Its eval report>.")

    slack.command("球队夺冠", command="/classify")
    answer = slack.reply(2)
    assert answer["response_type"] == "in_channel"
    # `*体育*  ←  …` from a serving without confidences, `*体育* · 87%  ←  …` with them
    assert re.match(r"\*体育\*( · \d+%)?  ←  球队夺冠$", answer["blocks"][0]["text"]["text"])
    assert f"answered by checkpoint {good}" in answer["blocks"][1]["elements"][0]["text"]
    slack.command("--model base 球队夺冠", command="/classify")
    assert "answered by the base model" in slack.reply(3)["blocks"][1]["elements"][0]["text"]
    slack.command("", command="/classify")
    assert "What should I classify?" in slack.reply(4)["text"]

    slack.command("rollback", user=GROUP_MEMBER)  # a confirmation first, then the click
    confirmation = slack.reply(5)
    assert confirmation["response_type"] == "ephemeral"
    _click_rollback(slack, confirmation, GROUP_MEMBER)
    announced = slack.standin.wait_for("chat.postMessage", 2)[1]  # after the report above
    assert "the base model answers `/classify` now" in announced["text"]
    assert slack.reply(6)["replace_original"] is True  # the confirmation's button is gone

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
    assert "has no evaluation yet" in slack.reply(7)["text"]
    slack.command(f"compare {good} {good}")
    table = slack.reply(8)["text"]
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


def _button(message: dict, action: str) -> dict:
    return next(
        e
        for b in message["blocks"]
        if b["type"] == "actions"
        for e in b["elements"]
        if e["action_id"] == action
    )


def _click_rollback(slack, confirmation: dict, user: str, action: str = "confirm_rollback") -> None:
    body = block_action_body(
        action,
        _button(confirmation, action)["value"],
        user_id=user,
        response_url=slack.standin.response_url("confirmation"),
    )
    assert slack.post(body).status_code == 200


def _promotions(engine) -> list[tuple[str, int | None, str]]:
    with new_session(engine) as session:
        rows = session.exec(select(Promotion).order_by(Promotion.id)).all()
    return [(p.action, p.checkpoint_id, p.decided_by) for p in rows]


def test_rollback_shows_its_target_and_rolls_back_on_an_approvers_fresh_click(
    slack, engine, checkpoints, serving
) -> None:
    good, meh = checkpoints["good"], checkpoints["meh"]

    def answers() -> int:
        return len(slack.standin.calls_to("response_url"))

    def command(text: str, user: str = APPROVER) -> dict:
        before = answers()
        slack.command(text, user=user)
        return slack.reply(before)

    command(f"promote {good} force")
    command(f"promote {meh} force")
    assert "only approvers can roll back" in command("rollback", user="U0STRANGER")["text"]
    assert command("rollback to 999")["text"] == (
        f":warning: serving refused: checkpoint 999 did not serve before checkpoint {meh}: "
        f"roll back to checkpoint {good} or the base model"
    )
    assert "`/finetune rollback to <checkpoint>`" in command("rollback 5")["text"]

    one_step = command("rollback")
    assert one_step["response_type"] == "ephemeral"
    shown = one_step["blocks"][0]["text"]["text"]
    assert f"Serving now: *checkpoint {meh}*" in shown
    assert f"After the rollback: *checkpoint {good}*" in shown
    assert (
        _button(one_step, "confirm_rollback")["text"]["text"] == f"Roll back to checkpoint {good}"
    )
    to_base = command("rollback to base")
    assert "After the rollback: *the base model*" in to_base["blocks"][0]["text"]["text"]
    assert len(_promotions(engine)) == 2  # showing changes nothing

    # A non-approver's click (a crafted request: the confirmation is ephemeral) changes nothing.
    _click_rollback(slack, one_step, "U0STRANGER")
    [refusal] = slack.standin.wait_for("chat.postEphemeral")
    assert refusal["text"] == ":lock: Only approvers can roll back; nothing was changed."
    assert len(_promotions(engine)) == 2

    before = answers()
    _click_rollback(slack, one_step, GROUP_MEMBER)
    [announced] = slack.standin.wait_for("chat.postMessage")
    assert announced["channel"] == "C0CHAN" and announced["text"] == (
        f":rewind: <@{GROUP_MEMBER}> rolled back: checkpoint {good} answers `/classify` now "
        f"(instead of checkpoint {meh})."
    )
    replaced = slack.reply(before)
    assert replaced["replace_original"] is True and replaced["text"] == announced["text"]

    # The other confirmation was shown while meh served: stale now, refused with what serves.
    _click_rollback(slack, to_base, APPROVER)
    stale = slack.standin.wait_for("chat.postEphemeral", 2)[1]
    assert stale["text"] == (
        ":warning: serving refused: what serves changed since the rollback was shown: "
        f"checkpoint {good} serves now, not checkpoint {meh}; nothing was rolled back"
    )
    assert _promotions(engine) == [
        ("promote", good, APPROVER),
        ("promote", meh, APPROVER),
        ("rollback", good, GROUP_MEMBER),
    ]
    assert _status(engine, good).status == CheckpointStatus.promoted
    assert _status(engine, meh).status == CheckpointStatus.retired

    cancel = command("rollback")
    before = answers()
    _click_rollback(slack, cancel, APPROVER, action="cancel_rollback")
    assert slack.reply(before)["text"] == "Rollback cancelled; nothing was changed."
    assert len(_promotions(engine)) == 3


def _serving_loaded(serving: str, checkpoint_id: int) -> bool:
    import httpx

    loaded = httpx.get(
        f"{serving}/v1/adapters", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    ).json()["loaded"]
    return any(a["checkpoint_id"] == checkpoint_id for a in loaded)


def _uncommitted_decision(engine, checkpoint_id: int, status: str, by: str):
    """Another approver's decision on the checkpoint row, written but not committed yet: the
    session holds the row (PostgreSQL) or the write lock (SQLite) until it commits."""
    from sqlalchemy import update

    session = new_session(engine)
    session.execute(
        update(Checkpoint)
        .where(Checkpoint.id == checkpoint_id, Checkpoint.status == CheckpointStatus.candidate)
        .values(status=status, decided_by=by)
    )
    return session


def test_a_checkpoint_rejected_after_the_approve_click_checked_it_is_not_served(
    slack, engine, checkpoints, serving
) -> None:
    """The race: Approve reads `candidate`, serving validates and loads the adapter, and a
    Reject commits before serving records the promotion. The promotion must lose."""
    good = checkpoints["good"]
    reject = _uncommitted_decision(engine, good, CheckpointStatus.rejected, GROUP_MEMBER)
    try:
        _click(slack, "approve_checkpoint", good, APPROVER)
        deadline = time.monotonic() + 60
        while not _serving_loaded(serving, good):  # validated and loaded: past every early check
            assert time.monotonic() < deadline, "serving never loaded the adapter"
            time.sleep(0.05)
        reject.commit()  # the Reject lands before serving records the promotion
    finally:
        reject.close()
    [told] = slack.standin.wait_for("chat.postEphemeral", timeout=60)
    assert told["user"] == APPROVER and told["text"] == (
        f"Checkpoint {good} was already rejected by <@{GROUP_MEMBER}>; nothing was changed."
    )
    assert _status(engine, good).status == CheckpointStatus.rejected
    assert _promotions(engine) == []  # never recorded as serving
    assert not slack.standin.calls_to("chat.update")  # the report keeps what the Reject wrote
    import httpx

    adapters = httpx.get(
        f"{serving}/v1/adapters", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    ).json()
    assert adapters["current"]["checkpoint_id"] is None  # the base model still answers
    assert adapters["loaded"] == []  # the refused adapter was unloaded again


def _wait_for_a_blocked_writer(engine) -> None:
    """Until another connection waits on a lock (PostgreSQL shows it); SQLite cannot show it, so
    give the bot a second to reach its write."""
    from sqlalchemy import text

    if engine.dialect.name != "postgresql":
        time.sleep(1.0)
        return
    deadline = time.monotonic() + 30
    with engine.connect() as connection:
        while not connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            )
        ).scalar():
            assert time.monotonic() < deadline, "the bot never waited on the row"
            time.sleep(0.05)


def test_a_reject_that_loses_to_a_promotion_says_so_and_changes_nothing(
    slack, engine, checkpoints
) -> None:
    meh = checkpoints["meh"]
    promote = _uncommitted_decision(engine, meh, CheckpointStatus.promoted, APPROVER)
    try:
        _click(slack, "reject_checkpoint", meh, GROUP_MEMBER)
        _wait_for_a_blocked_writer(engine)
        promote.commit()
    finally:
        promote.close()
    [told] = slack.standin.wait_for("chat.postEphemeral", timeout=60)
    assert told["user"] == GROUP_MEMBER and told["text"] == (
        f"Checkpoint {meh} was already promoted by <@{APPROVER}>; nothing was changed."
    )
    assert _status(engine, meh).status == CheckpointStatus.promoted
    assert not slack.standin.calls_to("chat.update")
    with new_session(engine) as session:
        assert [a.action for a in session.exec(select(AuditLog))] == []  # no reject recorded
