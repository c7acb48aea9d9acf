"""Corrections become data: a "Wrong label?" choice and a 👍 on `/classify` answers, through signed
block_actions, stored once per user and answer, counted by `/finetune feedback`, and exported
as a dataset version (train split only, in the checkpoint's training format) that a job is
queued on; another channel's checkpoint is refused; retention prunes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlmodel import select

from bot.answer_blocks import FEEDBACK_BLOCK
from bot.standin import block_action_body
from core.protocol import PromptFrame, answer_of, parse_answer, render_training_example
from runner.datasets.ingest import read_split
from runner.job import run_job
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import claim_next_job
from storage.models import Checkpoint, Dataset, Feedback, Job
from storage.types import utcnow
from tests.bot.conftest import ingest, send_json

LABELS = ["体育", "财经", "娱乐"]


class _Serving(BaseHTTPRequestHandler):
    """Serving's `/v1/classify`, canned: checkpoint ``server.checkpoint_id`` says 体育 at 62%,
    or free text when ``server.free_text``."""

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server: Any = self.server
        model = {
            "adapter": f"checkpoint-{server.checkpoint_id}",
            "checkpoint_id": server.checkpoint_id,
        }
        if server.free_text:
            answer = {"kind": "free_text", "answer": "一段话", "label": None, "model": model}
        else:
            answer = {
                "kind": "label",
                "answer": "体育",
                "label": "体育",
                "confidence": 0.62,
                "uncertain": False,
                "scores": {"体育": 0.62, "财经": 0.3, "娱乐": 0.08},
                "reasoning": f"讲的是{asked['text']}。",
                "model": model,
                "latency_ms": 12.0,
            }
        send_json(self, answer)


@pytest.fixture
def serving() -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Serving)
    server.checkpoint_id, server.free_text = None, False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture
def bot_extra_settings(serving, tiny_model_dir) -> dict:
    return {
        "serving_url": f"http://127.0.0.1:{serving.server_address[1]}",
        "base_model": str(tiny_model_dir),
    }


def _checkpoint(slack, engine, channel: str) -> int:
    """A checkpoint of a job of ``channel``, trained on the demo dataset (with reasoning)."""
    dataset = ingest(slack, engine, channel=channel)
    with new_session(engine) as session:
        job = Job(base_model="tiny", status="succeeded", channel_id=channel, dataset_id=dataset.id)
        session.add(job)
        session.flush()
        checkpoint = Checkpoint(
            job_id=job.id,
            step=8,
            final=True,
            path=f"c/{job.id}",
            base_model="tiny",
            meta={
                "labels": LABELS,
                "prompt_frame": dataset.prompt_frame,
                "answer_style": {"reasoning": True, "separator": "\n\n"},
                "dataset": {"id": dataset.id, "name": dataset.name, "version": dataset.version},
            },
        )
        session.add(checkpoint)
        session.commit()
        assert checkpoint.id is not None
        return checkpoint.id


def _classify(slack, text: str, channel: str = "C0CHAN") -> list[dict[str, Any]]:
    before = len(slack.standin.calls_to("response_url"))
    assert slack.command(text, command="/classify", channel=channel).status_code == 200
    return slack.reply(before)["blocks"]


def _control(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return next(b for b in blocks if b.get("block_id") == FEEDBACK_BLOCK)


def _choose(slack, blocks, *, ts: str, user: str, label: str | None, channel: str = "C0CHAN"):
    """The "Wrong label?" select set to ``label``, or (None) the 👍, on the answer at ``ts``."""
    before = len(slack.standin.calls_to("chat.postEphemeral"))
    control = _control(blocks)
    if label is None:
        body = block_action_body(
            "confirm_label",
            control["elements"][1]["value"],
            user_id=user,
            channel_id=channel,
            message_ts=ts,
            blocks=blocks,
        )
    else:
        body = block_action_body(
            "correct_label",
            "",
            selected=label,
            user_id=user,
            channel_id=channel,
            message_ts=ts,
            blocks=blocks,
        )
    assert slack.post(body).status_code == 200
    return slack.standin.wait_for("chat.postEphemeral", before + 1)[before]["text"]


def _feedback(engine) -> list[tuple[str, str, str, str, str]]:
    with new_session(engine) as session:
        rows = session.exec(select(Feedback).order_by(Feedback.id)).all()
        return [(r.kind, r.user_id, r.text, r.predicted_label, r.correct_label) for r in rows]


def test_a_correction_and_a_confirmation_become_a_dataset_version_a_job_is_queued_on(
    slack, engine, serving, tokenizer
) -> None:
    checkpoint_id = _checkpoint(slack, engine, "C0CHAN")
    serving.checkpoint_id = checkpoint_id
    wrong = _classify(slack, "央行宣布降准")
    options = [o["value"] for o in _control(wrong)["elements"][0]["options"]]
    assert options == ["娱乐", "财经"]  # the checkpoint's other labels
    said = _choose(slack, wrong, ts="100.1", user="U0ALICE", label="娱乐")
    assert "*娱乐* is the right label" in said
    said = _choose(slack, wrong, ts="100.1", user="U0ALICE", label="财经")  # changed her mind
    right = _classify(slack, "球队夺冠")
    assert "got it right" in _choose(slack, right, ts="100.2", user="U0BOB", label=None)
    _choose(slack, right, ts="100.2", user="U0BOB", label=None)  # a double click
    assert _feedback(engine) == [
        ("correction", "U0ALICE", "央行宣布降准", "体育", "财经"),
        ("confirmation", "U0BOB", "球队夺冠", "体育", "体育"),
    ]
    with new_session(engine) as session:
        stored = session.exec(select(Feedback)).first()
        assert stored is not None
        assert (stored.confidence, stored.checkpoint_id, stored.channel_id) == (
            0.62,
            checkpoint_id,
            "C0CHAN",
        )

    summary = slack.ask("feedback")["text"]
    assert "2 answers judged, 1 corrected, 1 confirmed" in summary
    assert "The model was right on 1 of 2 (50%)" in summary
    assert "• *财经*: corrected to it 1 (the model said 体育 ×1)" in summary
    assert "• *体育*: confirmed 1" in summary

    exported = slack.ask("feedback export confirmations=on")
    assert exported["response_type"] == "in_channel"
    assert "as dataset *feedback* v1: 2 train samples, no eval split" in exported["text"]
    with new_session(engine) as session:
        dataset = session.exec(select(Dataset).where(Dataset.name == "feedback")).one()
        frame = PromptFrame.from_dict(dataset.prompt_frame)
        assert (dataset.channel_id, dataset.uploaded_by) == ("C0CHAN", "U0USER")
        assert (dataset.train_samples, dataset.eval_sha256, dataset.labels) == (2, None, LABELS)
        rows = session.exec(select(Feedback)).all()
        assert {(r.dataset_id, r.exported_at is not None) for r in rows} == {(dataset.id, True)}
        dataset_id, train_sha256 = dataset.id, dataset.train_sha256
    conversations = read_split(ArtifactStore(slack.settings.artifact_dir), train_sha256)
    assert [parse_answer(answer_of(c)).label for c in conversations] == ["财经", "体育"]
    assert [c[:-1] for c in conversations] == [
        frame.conversation("央行宣布降准"),
        frame.conversation("球队夺冠"),
    ]
    assert answer_of(conversations[0]) == "<think>\n\n</think>\n\n财经"
    for conversation in conversations:  # what training renders (runner/job.py)
        example = render_training_example(tokenizer, conversation)
        assert example.answer_len > 1

    again = slack.ask("feedback export confirmations=on")["text"]
    assert "nothing new to export" in again

    before = len(slack.standin.calls_to("chat.postMessage"))
    slack.command("start dataset=feedback epochs=1")
    slack.standin.wait_for("chat.postMessage", before + 1)
    with new_session(engine) as session:
        job = session.exec(select(Job).where(Job.dataset_id == dataset_id)).one()
        assert (job.kind, job.status, job.channel_id) == ("train", "queued", "C0CHAN")
        claimed = claim_next_job(session, owner="inline", lease_seconds=60)
        assert claimed is not None and claimed.id == job.id
        token = claimed.lease_token
    run_job(job.id, token, slack.settings)  # a runner's own code, on the tiny model
    with new_session(engine) as session:
        trained = session.get(Job, job.id)
        assert trained is not None and trained.status == "succeeded", trained
        final = session.exec(select(Checkpoint).where(Checkpoint.job_id == job.id)).all()[-1]
        assert final.meta["labels"] == LABELS
        assert final.meta["prompt_frame"] == frame.to_dict()
        assert final.meta["answer_style"]["reasoning"] is True


def test_confirmations_stay_out_of_an_export_unless_asked_and_a_changed_choice_is_new(
    slack, engine, serving
) -> None:
    serving.checkpoint_id = _checkpoint(slack, engine, "C0CHAN")
    answer = _classify(slack, "球队夺冠")
    _choose(slack, answer, ts="200.1", user="U0BOB", label=None)
    assert "nothing new to export" in slack.ask("feedback export")["text"]
    _choose(slack, answer, ts="200.1", user="U0BOB", label="娱乐")
    assert (
        "dataset *news-fixes* v1: 1 train samples"
        in slack.ask("feedback export news-fixes")["text"]
    )
    _choose(slack, answer, ts="200.1", user="U0BOB", label="财经")  # exported, then changed
    assert (
        "dataset *news-fixes* v2: 1 train samples"
        in slack.ask("feedback export news-fixes")["text"]
    )
    assert len(_feedback(engine)) == 1


def test_a_headline_of_the_eval_split_is_kept_out_of_the_export(slack, engine, serving) -> None:
    serving.checkpoint_id = _checkpoint(slack, engine, "C0CHAN")
    with new_session(engine) as session:
        demo = session.exec(select(Dataset).where(Dataset.name == "news")).one()
        assert demo.eval_sha256 is not None
        frame = PromptFrame.from_dict(demo.prompt_frame)
    evaluated = read_split(ArtifactStore(slack.settings.artifact_dir), demo.eval_sha256)[0]
    headline = evaluated[-2].content.removeprefix(frame.prefix).removesuffix(frame.suffix)
    answer = _classify(slack, headline)
    _choose(slack, answer, ts="300.1", user="U0ALICE", label="财经")
    said = slack.ask("feedback export")["text"]
    assert "all in the eval split" in said
    assert not [d for d in _datasets(engine) if d == "feedback"]
    other = _classify(slack, "央行宣布降准")
    _choose(slack, other, ts="300.2", user="U0ALICE", label="财经")
    said = slack.ask("feedback export")["text"]
    assert "1 train samples" in said and "1 left out: in the eval split" in said


def _datasets(engine) -> list[str]:
    with new_session(engine) as session:
        return [d.name for d in session.exec(select(Dataset))]


def test_a_click_on_another_channels_checkpoint_or_a_foreign_label_stores_nothing(
    slack, engine, serving
) -> None:
    serving.checkpoint_id = _checkpoint(slack, engine, "C0OTHER")
    answer = _classify(slack, "球队夺冠", channel="C0CHAN")
    said = _choose(slack, answer, ts="400.1", user="U0ALICE", label="财经")
    assert (
        said
        == f":warning: no checkpoint {serving.checkpoint_id} in this channel; nothing was recorded."
    )
    serving.checkpoint_id = _checkpoint(slack, engine, "C0CHAN")
    answer = _classify(slack, "球队夺冠")
    said = _choose(slack, answer, ts="400.2", user="U0ALICE", label="时政")  # not in its set
    assert "`时政` is not a label of checkpoint" in said
    assert _feedback(engine) == []
    assert "No feedback in this channel yet" in slack.ask("feedback")["text"]


def test_only_label_answers_of_a_checkpoint_carry_the_control(slack, engine, serving) -> None:
    serving.checkpoint_id = _checkpoint(slack, engine, "C0CHAN")
    assert [b for b in _classify(slack, "球队夺冠") if b.get("block_id") == FEEDBACK_BLOCK]
    serving.free_text = True
    assert not [b for b in _classify(slack, "球队夺冠") if b.get("block_id") == FEEDBACK_BLOCK]


def test_feedback_past_its_retention_is_pruned_by_the_runner(slack, engine, serving) -> None:
    from runner.worker import Runner

    serving.checkpoint_id = _checkpoint(slack, engine, "C0CHAN")
    answer = _classify(slack, "球队夺冠")
    _choose(slack, answer, ts="500.1", user="U0ALICE", label="财经")
    _choose(slack, answer, ts="500.1", user="U0BOB", label=None)
    with new_session(engine) as session:
        old = session.exec(select(Feedback).where(Feedback.user_id == "U0ALICE")).one()
        old.created_at = utcnow() - timedelta(days=181)
        session.add(old)
        session.commit()
    worker = Runner(slack.settings.model_copy(update={"feedback_retention_days": 180}), devices=[])
    worker.prune()
    worker.engine.dispose()
    assert [row[1] for row in _feedback(engine)] == ["U0BOB"]


def test_a_failed_export_stores_no_dataset_and_marks_nothing_exported(
    slack, engine, serving, monkeypatch
) -> None:
    import runner.datasets.feedback

    serving.checkpoint_id = _checkpoint(slack, engine, "C0CHAN")
    answer = _classify(slack, "央行宣布降准")
    _choose(slack, answer, ts="600.1", user="U0ALICE", label="财经")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(runner.datasets.feedback, "mark_feedback_exported", fail)
    assert "Something went wrong" in slack.ask("feedback export")["text"]
    assert "feedback" not in _datasets(engine)
    with new_session(engine) as session:
        assert session.exec(select(Feedback)).one().exported_at is None
    monkeypatch.undo()
    assert "dataset *feedback* v1" in slack.ask("feedback export")["text"]


def test_an_export_racing_another_version_of_its_name_stores_nothing(
    slack, engine, serving, monkeypatch
) -> None:
    import storage.datasets

    serving.checkpoint_id = _checkpoint(slack, engine, "C0CHAN")
    answer = _classify(slack, "央行宣布降准")
    _choose(slack, answer, ts="700.1", user="U0ALICE", label="财经")
    assert "dataset *feedback* v1" in slack.ask("feedback export")["text"]
    _choose(slack, answer, ts="700.1", user="U0ALICE", label="娱乐")
    # What a concurrent export sees: it read the next version before the other one committed.
    monkeypatch.setattr(storage.datasets, "next_dataset_version", lambda *a, **k: 1)
    said = slack.ask("feedback export")["text"]
    assert "got a new version while this export was written; nothing was stored" in said
    with new_session(engine) as session:
        assert session.exec(select(Feedback)).one().exported_at is None
    assert _datasets(engine).count("feedback") == 1
