"""`/finetune` commands through signed HTTP requests, with every Slack call the bot makes
recorded by the stand-in (SQLite and PostgreSQL)."""

from __future__ import annotations

import time

from sqlmodel import select

from bot.standin import slash_command_body
from core.enums import JobStatus
from runner.datasets.ingest import IngestOptions, ingest_dataset
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import claim_next_job
from storage.models import Job
from tests.bot.conftest import APPROVER, GROUP_MEMBER, SECRET
from tests.conftest import DEMO_DATASET


def _dataset(slack, engine, channel: str | None = "C0CHAN", name: str = "news") -> None:
    with new_session(engine) as session:
        ingest_dataset(
            session,
            ArtifactStore(slack.settings.artifact_dir),
            DEMO_DATASET,
            IngestOptions.from_settings(slack.settings),
            name=name,
            tokenizer=None,
            channel_id=channel,
            uploaded_by="U0USER",
        )


def test_a_bad_signature_or_a_stale_timestamp_gets_401(slack) -> None:
    body = slash_command_body("/finetune", "help", response_url=slack.standin.response_url())
    assert slack.post(body, secret="not-the-secret").status_code == 401
    assert slack.post(body, timestamp=int(time.time()) - 600).status_code == 401
    assert slack.post(body).status_code == 200
    assert len(slack.standin.wait_for("response_url")) == 1  # only the signed one answered


def test_upload_explains_how_to_share_a_file(slack) -> None:
    slack.command("upload")
    reply = slack.reply(0)
    assert reply["response_type"] == "ephemeral"
    assert (
        "Share a dataset file in this channel" in reply["text"] and "Up to 50 MiB" in reply["text"]
    )


def test_help_and_an_unknown_subcommand_answer_ephemerally(slack) -> None:
    assert slack.command("help").status_code == 200
    reply = slack.reply(0)
    assert reply["response_type"] == "ephemeral" and "`/finetune start" in reply["text"]
    assert "learning_rate (lr, …" not in reply["text"] and "learning_rate (lr)" in reply["text"]
    slack.command("frobnicate now")
    reply = slack.reply(1)
    assert reply["text"].startswith("Unknown subcommand `frobnicate`")
    assert "/finetune cancel <job>" in reply["text"]


def test_start_queues_a_job_and_posts_its_root_message(slack, engine) -> None:
    _dataset(slack, engine)
    assert (
        slack.command("start lr=5e-6 grad_accum=2 loraplus_lr_ratio=16 lora_target=all").status_code
        == 200
    )
    [posted] = slack.standin.wait_for("chat.postMessage")
    assert slack.wait_for_thread(engine, 1).startswith("17000000")
    assert posted["channel"] == "C0CHAN" and posted["_token"] == slack.standin.bot_token
    header = posted["blocks"][0]["text"]["text"]
    assert "*Fine-tuning job 1* · queued" in header and "*news* v1 (300 train, 100 eval)" in header
    with new_session(engine) as session:
        job = session.exec(select(Job)).one()
    assert job.config == {
        "learning_rate": 5e-6,
        "gradient_accumulation_steps": 2,
        "loraplus_lr_ratio": 16.0,
    }
    assert (job.requested_by, job.channel_id, job.status) == ("U0USER", "C0CHAN", "queued")
    assert job.thread_ts is not None and job.dataset_id is not None
    assert not slack.standin.calls_to("response_url")  # nothing ephemeral: the channel saw it


def test_invalid_settings_are_refused_with_what_is_allowed(slack, engine) -> None:
    _dataset(slack, engine)
    slack.command("start lr=1")
    assert "lr=1 is not allowed: learning_rate must be > 0 and ≤ 0.01" in slack.reply(0)["text"]
    slack.command("start foo=1")
    reply = slack.reply(1)["text"]
    assert "unknown setting `foo`; allowed: method" in reply and "learning_rate (lr)" in reply
    slack.command("start use_dora=true")
    assert "vLLM cannot serve DoRA adapters" in slack.reply(2)["text"]
    with new_session(engine) as session:
        assert session.exec(select(Job)).all() == []
    assert not slack.standin.calls_to("chat.postMessage")


def test_start_needs_a_dataset(slack, engine) -> None:
    slack.command("start lr=5e-6")
    assert "no dataset uploaded in this channel yet" in slack.reply(0)["text"]
    _dataset(slack, engine, channel="C0OTHER", name="elsewhere")
    slack.command("start dataset=missing")
    assert "no dataset named missing in this channel" in slack.reply(1)["text"]
    slack.command(
        "start dataset=elsewhere lr=5e-6"
    )  # another channel's (tests/bot/test_tenants.py)
    assert "no dataset named elsewhere in this channel" in slack.reply(2)["text"]
    _dataset(slack, engine, channel=None, name="news-demo")  # the deployment's: every channel's
    slack.command("start dataset=news-demo lr=5e-6")
    [posted] = slack.standin.wait_for("chat.postMessage")
    assert "*news-demo* v1" in posted["blocks"][0]["text"]["text"]


def test_datasets_status_and_list(slack, engine) -> None:
    _dataset(slack, engine)
    slack.command("datasets")
    assert "*news* v1 · 300 train / 100 eval · 10 labels" in slack.reply(0)["text"]
    slack.command("start lr=5e-6")
    slack.standin.wait_for("chat.postMessage")
    slack.command("status")
    status = slack.reply(1)
    assert "*Fine-tuning job 1* · queued" in status["blocks"][0]["text"]["text"]
    slack.command("list")
    assert "job 1 · queued" in slack.reply(2)["text"]
    slack.command("status 99")
    assert "no job 99" in slack.reply(3)["text"]
    slack.command("status 1 2")
    assert slack.reply(4)["text"] == (
        ":warning: `2`: `/finetune status [job]` takes one number (approvers may end it with `all`)"
    )


def test_cancel_is_for_the_requester_and_approvers(slack, engine) -> None:
    _dataset(slack, engine)
    for _ in range(3):
        slack.command("start lr=5e-6")
    slack.standin.wait_for("chat.postMessage", 3)
    for job_id in (1, 2, 3):
        slack.wait_for_thread(engine, job_id)
    slack.command("cancel 1", user="U0STRANGER")
    assert (
        "only <@U0USER> (who started job 1) or an approver can cancel it" in slack.reply(0)["text"]
    )
    slack.command("cancel 1")  # the requester
    assert "Job 1 cancelled." in slack.reply(1)["text"]
    slack.command("cancel 2", user=APPROVER)
    assert "Job 2 cancelled." in slack.reply(2)["text"]
    with new_session(engine) as session:
        claim_next_job(session, owner="runner", lease_seconds=60)  # job 3 is now running
    slack.command("cancel 3", user=GROUP_MEMBER)  # an approver through the user group
    assert "Job 3 asked to stop" in slack.reply(3)["text"]
    assert slack.standin.calls_to("usergroups.users.list")[0]["usergroup"] == "S0APPROVERS"
    with new_session(engine) as session:
        jobs = {j.id: j for j in session.exec(select(Job)).all()}
    assert jobs[1].status == jobs[2].status == JobStatus.cancelled
    assert jobs[3].status == JobStatus.running and jobs[3].cancel_requested
    assert SECRET not in str(slack.standin.calls)


def test_start_without_arguments_opens_the_form_and_its_submission_queues_the_job(
    slack,
    engine,
) -> None:
    import json

    from bot.standin import view_submission_body

    _dataset(slack, engine)
    slack.command("start")
    [opened] = slack.standin.wait_for("views.open")
    view = opened["view"]
    assert opened["trigger_id"] == "T0TRIGGER" and view["callback_id"] == "start_job"
    fields = {b["block_id"]: b for b in view["blocks"]}
    assert fields["dataset"]["element"]["initial_option"]["text"]["text"] == "news v1"
    assert fields["cfg_learning_rate"]["element"]["initial_value"] == "5e-05"
    assert "> 0 and ≤ 0.01" in fields["cfg_learning_rate"]["hint"]["text"]
    assert fields["dataset_file"]["element"]["type"] == "file_input"

    def submit(learning_rate: str, extra: str = "") -> dict:
        values = {
            "dataset": {
                "value": {
                    "selected_option": {
                        "value": fields["dataset"]["element"]["initial_option"]["value"]
                    }
                }
            },
            "cfg_learning_rate": {"value": {"value": learning_rate}},
            "cfg_gradient_accumulation_steps": {"value": {"value": "2"}},
            "extra_settings": {"value": {"value": extra}},
        }
        response = slack.post(
            view_submission_body(
                "start_job", values, private_metadata=json.dumps({"channel_id": "C0CHAN"})
            )
        )
        assert response.status_code == 200
        return response.json() if response.content else {}

    refused = submit("1")
    assert refused["response_action"] == "errors"
    assert "learning_rate must be > 0 and ≤ 0.01" in refused["errors"]["cfg_learning_rate"]
    assert "unknown setting" in submit("5e-6", "frobs=3")["errors"]["extra_settings"]
    assert submit("5e-6", "loraplus=16") == {}
    slack.standin.wait_for("chat.postMessage")
    with new_session(engine) as session:
        job = session.exec(select(Job)).one()
    assert job.config == {
        "learning_rate": 5e-6,
        "gradient_accumulation_steps": 2,
        "loraplus_lr_ratio": 16.0,
    }


def test_export_is_for_approvers_and_queues_an_export_job_with_its_thread(slack, engine) -> None:
    from storage.models import Checkpoint, Dataset

    _dataset(slack, engine)
    with new_session(engine) as session:
        dataset = session.exec(select(Dataset)).one()
        trained = Job(base_model="tiny", dataset_id=dataset.id, status="succeeded")
        session.add(trained)
        session.flush()
        session.add(
            Checkpoint(job_id=trained.id, step=9, final=True, path="c/1", base_model="tiny")
        )
        session.commit()
    slack.command("export 1", user="U0STRANGER")
    assert "only approvers can export a model" in slack.reply(0)["text"]
    slack.command("export 1 bits=3", user=APPROVER)
    assert "`bits=3`: the export settings are bits=8|4, or format=gguf" in slack.reply(1)["text"]
    slack.command("export 99", user=APPROVER)
    assert "no checkpoint 99 in this channel" in slack.reply(2)["text"]
    slack.command("export 1 bits=4", user=APPROVER)
    [posted] = slack.standin.wait_for("chat.postMessage")
    assert "*Export job 2* · queued" in posted["blocks"][0]["text"]["text"]
    slack.wait_for_thread(engine, 2)
    with new_session(engine) as session:
        job = session.get(Job, 2)
    assert (job.kind, job.config, job.requested_by) == (
        "export",
        {"checkpoint_id": 1, "bits": 4},
        APPROVER,
    )
    assert job.dataset_id == dataset.id and job.status == "queued"

    # GGUF: format=gguf with a quant type; a type the writer does not offer is refused.
    slack.command("export 1 format=gguf quant=Q4_K_M", user=APPROVER)
    assert "quant=q4_k_m is not offered: use f16, q8_0 or q4_0" in slack.reply(3)["text"]
    slack.command("export 1 format=gguf quant=q8_0", user=APPROVER)
    slack.wait_for_thread(engine, 3)
    with new_session(engine) as session:
        assert session.get(Job, 3).config == {"checkpoint_id": 1, "quant": "q8_0"}
