"""A benchmark dataset (the general-ability check's questions) is refused as training data at
``/finetune start``, before any job is queued, and the reply says why."""

from __future__ import annotations

from sqlmodel import select

from runner.datasets.ingest import IngestOptions
from runner.eval.benchmark import ingest_benchmark
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.models import Job
from tests.runner.test_benchmark import ceval_files, write


def test_start_refuses_a_benchmark_as_training_data(slack, engine, tmp_path) -> None:
    with new_session(engine) as session:
        ingest_benchmark(
            session,
            ArtifactStore(slack.settings.artifact_dir),
            write(tmp_path / "ceval-mini", ceval_files()),
            IngestOptions.from_settings(slack.settings).limits,
            name="general",
        )
    slack.command("start dataset=general lr=5e-6")
    reply = slack.reply(0)
    assert "dataset general is a benchmark" in reply["text"]
    assert reply.get("response_type", "ephemeral") == "ephemeral"  # to the user, not the channel
    with new_session(engine) as session:
        assert session.exec(select(Job)).first() is None  # nothing queued


def test_start_refuses_a_mix_the_channel_cannot_use(slack, engine) -> None:
    from tests.bot.conftest import ingest

    ingest(slack, engine, name="news")
    ingest(slack, engine, channel="C0OTHER", name="general")  # another channel's, not shared
    slack.command("start dataset=news mix=general:0.2")
    assert "mix: no dataset named general that this channel may use" in slack.reply(0)["text"]
    with new_session(engine) as session:
        assert session.exec(select(Job)).first() is None  # nothing queued
