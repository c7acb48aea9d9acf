"""`/finetune sweep` through signed requests against the Slack stand-in: a 2×2 sweep queued as one
thread whose root is the comparison table, bad sweeps refused with the setting or the count, cancel
for the requester and approvers only; and a finished sweep's thread: the plots, the best run by
macro-F1 marked with Approve & promote best, which promotes it for an approver and is refused for
anyone else."""

from __future__ import annotations

import json
import time

import pytest
from sqlmodel import select

from bot.standin import block_action_body
from core.enums import CheckpointStatus, JobStatus
from runner.plots import loss_curve_png
from runner.sweep import after_run
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import add_job_event
from storage.models import Checkpoint, Evaluation, Job, Sweep
from storage.sweeps import sweep_jobs
from tests.bot.conftest import APPROVER, deliver_all, ingest
from tests.bot.test_actions import (  # noqa: F401 - fixtures: a real serving app, two adapters
    adapter_cache,
    bot_extra_settings,
    checkpoints,
    serving,
    serving_port,
)
from tests.bot.test_home import _home


def _sweeps(engine) -> list[Sweep]:
    with new_session(engine) as session:
        return list(session.exec(select(Sweep)).all())


def _threaded_sweep(engine) -> Sweep:
    """The one sweep, once the bot has committed its thread (just after posting its root)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = _sweeps(engine)
        if found and found[0].thread_ts:
            return found[0]
        time.sleep(0.02)
    raise AssertionError("the sweep never got its thread")


def test_a_sweep_is_one_thread_whose_root_compares_its_runs(slack, engine) -> None:
    ingest(slack, engine)
    reply = slack.ask("sweep lr=1e-5,2e-5,3e-5 epochs=1,2,3")
    assert "the sweep has 9 runs (3 lr × 3 epochs); at most 8 are allowed" in reply["text"]
    reply = slack.ask("sweep lr=1e-5,abc")
    assert "lr=abc is not a number; learning_rate must be > 0" in reply["text"]
    assert _sweeps(engine) == []  # nothing queued by a refusal

    assert slack.command("sweep lr=1e-5,5e-5 epochs=1,2 lora_rank=16").status_code == 200
    [root] = slack.standin.wait_for("chat.postMessage")
    assert root["text"] == "Sweep 1 queued: 4 runs"
    found = _threaded_sweep(engine)
    with new_session(engine) as session:
        runs = sweep_jobs(session, found.id)
    assert found.thread_ts == root["_ts"] and found.grid == {
        "learning_rate": ["1e-5", "5e-5"],
        "num_train_epochs": ["1", "2"],
    }
    assert [(j.config["learning_rate"], j.config["num_train_epochs"]) for j in runs] == [
        (1e-5, 1),
        (1e-5, 2),
        (5e-5, 1),
        (5e-5, 2),
    ]
    assert {j.thread_ts for j in runs} == {root["_ts"]}  # one thread: claimable, all of them
    assert all(j.config["lora_rank"] == 16 and j.requested_by == "U0USER" for j in runs)
    table = json.dumps(root["blocks"], ensure_ascii=False)
    for job in runs:
        assert f"job {job.id} · `learning_rate=" in table
    assert "Approve & promote best" not in table  # nothing finished yet

    home = json.dumps(_home(slack, "U0USER"), ensure_ascii=False)  # the requester's App Home
    assert "Recent sweeps" in home and "*Sweep 1* in <#C0CHAN> · 0/4 runs ended" in home
    assert "Sweep 1" not in json.dumps(_home(slack, "U0OTHER"), ensure_ascii=False)

    refused = slack.ask("sweep cancel 1", user="U0OTHER")
    assert "only <@U0USER> (who started sweep 1) or an approver can cancel it" in refused["text"]
    assert slack.ask("sweep cancel 1", channel="C0ELSE")["text"].endswith("no sweep 1")
    [cancel] = [
        e
        for b in root["blocks"]
        if b["type"] == "actions"
        for e in b["elements"]
        if e["action_id"] == "cancel_sweep"
    ]
    assert cancel["value"] == "1" and "confirm" in cancel  # destructive: a confirm dialog

    def click(user: str) -> dict:
        before = len(slack.standin.calls_to("chat.postEphemeral"))
        body = block_action_body("cancel_sweep", "1", user_id=user, message_ts=root["_ts"])
        assert slack.post(body).status_code == 200
        return slack.standin.wait_for("chat.postEphemeral", before + 1)[before]

    stranger = click("U0OTHER")  # the button is checked on the server as the command is
    assert stranger["user"] == "U0OTHER" and "or an approver can cancel it" in stranger["text"]
    with new_session(engine) as session:
        assert {j.status for j in sweep_jobs(session, found.id)} == {JobStatus.queued.value}
    assert "Sweep 1: cancel asked of 4 runs" in click("U0USER")["text"]
    with new_session(engine) as session:
        assert {j.status for j in sweep_jobs(session, found.id)} == {JobStatus.cancelled.value}
    assert "every run of sweep 1 already ended" in slack.ask("sweep cancel 1")["text"]


def test_a_sweep_whose_root_slack_refuses_is_cancelled_whole_and_says_how_to_fix_it(
    slack, engine
) -> None:
    ingest(slack, engine)
    slack.standin.inject("chat.postMessage", error="not_in_channel")
    reply = slack.ask("sweep lr=1e-5,5e-5")
    assert "sweep 1 and its 2 runs were cancelled, nothing ran" in reply["text"]
    assert "/invite @finetune-bot" in reply["text"]
    [found] = _sweeps(engine)
    with new_session(engine) as session:
        runs = sweep_jobs(session, found.id)
    assert found.thread_ts is None and len(runs) == 2
    assert {(j.status, j.thread_ts) for j in runs} == {(JobStatus.cancelled.value, None)}
    assert all("could not be posted" in (j.error or "") for j in runs)


def _finish(engine, store: ArtifactStore, checkpoint_by_run: dict[int, tuple[int, float]]) -> None:
    """The runs trained and evaluated as a runner records it: a ``trained`` event with the
    losses, the job succeeded, its final checkpoint evaluated (macro-F1 as given)."""
    with new_session(engine) as session:
        for job_id, (checkpoint_id, macro_f1) in checkpoint_by_run.items():
            curve = [2.0, 1.5, 1.0 - macro_f1]
            losses = store.put_bytes(json.dumps(curve).encode())
            add_job_event(  # the payload runner.job writes
                session,
                job_id=job_id,
                kind="trained",
                steps=3,
                total_steps=3,
                final_loss=curve[-1],
                tokens=3000,
                seconds=3.0,
                tokens_per_s=1000.0,
                loss_curve_sha256=store.put_bytes(loss_curve_png(curve)).sha256,
                losses_sha256=losses.sha256,
                dataset="news",
            )
            job = session.get(Job, job_id)
            job.status = JobStatus.succeeded.value
            checkpoint = session.get(Checkpoint, checkpoint_id)
            checkpoint.job_id, checkpoint.final = job_id, True
            session.add(
                Evaluation(
                    checkpoint_id=checkpoint_id,
                    dataset_id=job.dataset_id,
                    base_model=job.base_model,
                    metrics={"accuracy": macro_f1, "macro_f1": macro_f1, "ece": 0.1},
                )
            )
        session.commit()


@pytest.mark.usefixtures("serving")
def test_a_finished_sweep_posts_its_plots_and_promotes_the_best_run_for_approvers_only(
    slack, engine, tiny_model_dir, request: pytest.FixtureRequest
) -> None:
    adapters = request.getfixturevalue("checkpoints")  # tests.bot.test_actions': good, meh
    ingest(slack, engine)
    assert slack.command("sweep lr=1e-5,5e-5").status_code == 200
    [root] = slack.standin.wait_for("chat.postMessage")
    found = _threaded_sweep(engine)
    with new_session(engine) as session:
        first, second = sweep_jobs(session, found.id)
        for job in (first, second):  # the adapters' base, so serving can load them
            job.base_model = str(tiny_model_dir)
            session.add(job)
        session.commit()
    store = ArtifactStore(slack.settings.artifact_dir)
    good, meh = adapters["good"], adapters["meh"]
    _finish(engine, store, {first.id: (meh, 0.4), second.id: (good, 0.8)})
    with new_session(engine) as session:
        assert after_run(session, store, sweep_id=found.id)  # this call finished it
        assert not after_run(session, store, sweep_id=found.id)  # and only this one

    deliver_all(slack, engine)
    uploads = slack.standin.calls_to("files.completeUploadExternal")
    titles = [f.get("title") for u in uploads for f in u.get("files") or []]
    assert {"Training loss, every run", "Eval accuracy and macro-F1 by run"} <= set(titles)
    assert all(u.get("thread_ts") == root["_ts"] for u in uploads)
    replies = [p["text"] for p in slack.standin.calls_to("chat.postMessage")]
    assert any(
        f"Sweep {found.id} finished: the best run by macro-F1 is job {second.id} "
        f"(checkpoint {good})" in t
        for t in replies
    )
    updates = [u for u in slack.standin.calls_to("chat.update") if u["ts"] == root["_ts"]]
    final = updates[-1]
    assert final["text"] == (
        f"Sweep {found.id}: finished, best run job {second.id} (`learning_rate=5e-5`, "
        "macro-F1 80.0%)"
    )
    table = json.dumps(final["blocks"], ensure_ascii=False)
    assert f"job {second.id} · `learning_rate=5e-5`" in table and ":star: *best*" in table
    [button] = [e for b in final["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert button["text"]["text"] == "Approve & promote best" and button["value"] == str(good)
    assert "confirm" in button  # a confirm dialog before promoting

    before = len(slack.standin.calls_to("chat.postEphemeral"))
    click = block_action_body(
        "approve_checkpoint", button["value"], user_id="U0STRANGER", message_ts=root["_ts"]
    )
    assert slack.post(click).status_code == 200
    refusal = slack.standin.wait_for("chat.postEphemeral", before + 1)[before]
    assert refusal["user"] == "U0STRANGER" and "Only approvers" in refusal["text"]
    with new_session(engine) as session:
        assert session.get(Checkpoint, good).status == CheckpointStatus.candidate

    updated = len(slack.standin.calls_to("chat.update"))
    click = block_action_body(
        "approve_checkpoint",
        button["value"],
        user_id=APPROVER,
        message_ts=root["_ts"],
        blocks=final["blocks"],
    )
    assert slack.post(click).status_code == 200
    decided = slack.standin.wait_for("chat.update", updated + 1)[updated]
    assert decided["ts"] == root["_ts"]
    assert f"Approved and promoted by <@{APPROVER}>" in decided["text"]
    with new_session(engine) as session:
        promoted = session.get(Checkpoint, good)
    assert promoted.status == CheckpointStatus.promoted and promoted.decided_by == APPROVER
