"""Channels are tenants: a channel sees its own jobs, checkpoints, scores and datasets, the
datasets other channels shared and the deployment's; another channel's are not found. Approvers
reach every channel's with a trailing `all`. Over signed HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

import json

from sqlmodel import select

from bot.standin import view_submission_body
from storage.db import new_session
from storage.models import Checkpoint, Dataset, Evaluation, Job
from tests.bot.conftest import APPROVER, ingest

A, B = "C0ALPHA", "C0BRAVO"


def _jobs(engine) -> list[Job]:
    with new_session(engine) as session:
        return list(session.exec(select(Job).order_by(Job.id)).all())


def _picker_options(slack, channel: str, before: int) -> list[str]:
    slack.command("start", channel=channel)
    view = slack.standin.wait_for("views.open", before + 1)[before]["view"]
    blocks = {b["block_id"]: b for b in view["blocks"]}
    if "dataset" not in blocks:
        return []
    return [o["text"]["text"] for o in blocks["dataset"]["element"]["options"]]


def _checkpoint_with_scores(engine, job_id: int, dataset_id: int) -> int:
    with new_session(engine) as session:
        checkpoint = Checkpoint(job_id=job_id, step=9, final=True, path="c/9", base_model="tiny")
        session.add(checkpoint)
        session.flush()
        session.add(
            Evaluation(
                checkpoint_id=checkpoint.id,
                dataset_id=dataset_id,
                base_model="tiny",
                metrics={"accuracy": 0.9, "macro_f1": 0.85},
            )
        )
        session.commit()
        return checkpoint.id


def test_another_channels_datasets_jobs_and_scores_are_not_found(slack, engine) -> None:
    news = ingest(slack, engine, channel=A)
    assert "*news* v1" in slack.ask("datasets", channel=A)["text"]
    listed = slack.ask("datasets", channel=B)["text"]
    assert "news" not in listed and listed.startswith("No datasets yet")
    refused = slack.ask("start dataset=news lr=5e-6", channel=B)["text"]
    assert refused == (
        ":warning: no dataset named news in this channel (its own, one shared by another "
        "channel, or the deployment's: `/finetune datasets`)"
    )
    assert _picker_options(slack, B, 0) == []  # the form offers only the file input
    assert _jobs(engine) == []

    slack.command("start lr=5e-6", channel=A)
    slack.wait_for_thread(engine, 1)
    checkpoint = _checkpoint_with_scores(engine, 1, news.id)
    for text in ("status 1", "cancel 1"):
        assert slack.ask(text, channel=B)["text"] == ":warning: no job 1 in this channel"
    assert slack.ask(f"compare {checkpoint} base", channel=B)["text"] == (
        f":warning: no checkpoint {checkpoint} in this channel"
    )
    assert f"checkpoint {checkpoint}" not in slack.ask("checkpoints", channel=B)["text"]
    assert slack.ask("list", channel=B)["text"] == "No jobs in this channel yet."
    assert (
        f"no checkpoint {checkpoint} in this channel"
        in (slack.ask(f"evaluate {checkpoint}", channel=B)["text"])
    )
    assert [(j.id, j.status) for j in _jobs(engine)] == [(1, "queued")]  # cancel found nothing
    assert "90.0%" in slack.ask(f"compare {checkpoint} {checkpoint}", channel=A)["text"]


def test_the_start_form_offers_only_what_the_channel_may_use(slack, engine, caplog) -> None:
    theirs = ingest(slack, engine, channel=A, name="theirs")
    ingest(slack, engine, channel=B, name="ours")
    ingest(slack, engine, channel=None, name="news-demo")
    assert _picker_options(slack, B, 0) == ["news-demo v1 · deployment", "ours v1"]

    # A crafted submission naming A's dataset (its id is not among B's options) queues nothing.
    values = {"dataset": {"value": {"selected_option": {"value": str(theirs.id)}}}}
    body = view_submission_body(
        "start_job", values, user_id="U0USER", private_metadata=json.dumps({"channel_id": B})
    )
    slack.post(body)
    [told] = slack.standin.wait_for("chat.postEphemeral")  # the form is closed: told privately
    assert told["channel"] == B and told["user"] == "U0USER"
    assert f"no dataset {theirs.id} in this channel" in told["text"]
    assert _jobs(engine) == [] and not slack.standin.calls_to("chat.postMessage")


def test_an_upload_of_the_same_name_in_another_channel_is_that_channels_v1(slack, engine) -> None:
    ingest(slack, engine, channel=A)
    second = ingest(slack, engine, channel=A)
    mine = ingest(slack, engine, channel=B)
    assert (second.version, mine.version) == (2, 1)
    slack.command("start lr=5e-6", channel=B)
    [posted] = slack.standin.wait_for("chat.postMessage")
    assert posted["channel"] == B and "*news* v1" in posted["blocks"][0]["text"]["text"]
    slack.command("start dataset=news lr=5e-6", channel=A)
    [_, theirs] = slack.standin.wait_for("chat.postMessage", 2)
    assert theirs["channel"] == A and "*news* v2" in theirs["blocks"][0]["text"]["text"]
    assert [j.dataset_id for j in _jobs(engine)] == [mine.id, second.id]


def test_a_shared_dataset_is_usable_in_every_channel_until_unshared(slack, engine) -> None:
    news = ingest(slack, engine, channel=A, user="U0OWNER")
    demo = ingest(slack, engine, channel=None, name="news-demo", user=None)
    assert (
        "only <@U0OWNER> (who uploaded it) or an approver can share dataset news"
        in (slack.ask("share news", channel=A, user="U0STRANGER")["text"])
    )
    assert (
        "no dataset named news was uploaded in this channel"
        in (slack.ask("share news", channel=B, user=APPROVER)["text"])
    )
    shared = slack.ask("share news", channel=A, user="U0OWNER")
    assert shared["response_type"] == "in_channel"
    assert shared["text"].startswith(":link: <@U0OWNER> shared dataset *news* (1 version")

    listed = slack.ask("datasets", channel=B)["text"]
    assert (
        f"*news* v1 · 300 train / 100 eval · 10 labels · llamafactory/sharegpt · by <@U0OWNER> · shared by <#{A}>"
        in listed
    )
    assert "*news-demo* v1" in listed and "the deployment's" in listed
    assert _picker_options(slack, B, 0) == ["news-demo v1 · deployment", "news v1 · shared"]
    slack.command("start dataset=news lr=5e-6", channel=B)
    slack.wait_for_thread(engine, 1)
    slack.command("start dataset=news-demo lr=5e-6", channel=B)
    slack.wait_for_thread(engine, 2)
    assert [j.dataset_id for j in _jobs(engine)] == [news.id, demo.id]

    unshared = slack.ask("unshare news", channel=A, user=APPROVER)
    assert unshared["text"] == (
        f":lock: <@{APPROVER}> unshared dataset *news*: only this channel can use it now."
    )
    assert (
        "no dataset named news in this channel"
        in (slack.ask("start dataset=news lr=5e-6", channel=B)["text"])
    )
    with new_session(engine) as session:
        assert session.get(Dataset, news.id).shared is False


def test_approvers_reach_every_channel_with_all(slack, engine) -> None:
    news = ingest(slack, engine, channel=A)
    slack.command("start lr=5e-6", channel=A)
    slack.wait_for_thread(engine, 1)
    checkpoint = _checkpoint_with_scores(engine, 1, news.id)
    refused = slack.ask("status 1 all", channel=B)["text"]
    assert refused == ":warning: only approvers can look in every channel (`all`)"

    status = slack.ask("status 1 all", channel=B, user=APPROVER)
    assert "*Fine-tuning job 1* · queued" in status["blocks"][0]["text"]["text"]
    assert (
        f"Fine-tuning job 1 · queued · <#{A}>"
        in (slack.ask("list all", channel=B, user=APPROVER)["text"])
    )
    assert (
        f"*news* v1 · 300 train / 100 eval · 10 labels · llamafactory/sharegpt · by <@U0USER> · <#{A}>"
        in (slack.ask("datasets all", channel=B, user=APPROVER)["text"])
    )
    assert (
        f"*checkpoint {checkpoint}* · fine-tuning job 1 (queued)"
        in (slack.ask("checkpoints all", channel=B, user=APPROVER)["text"])
    )
    assert (
        "90.0%"
        in slack.ask(f"compare {checkpoint} {checkpoint} all", channel=B, user=APPROVER)["text"]
    )
    assert slack.ask("cancel 1 all", channel=B, user=APPROVER)["text"] == "Job 1 cancelled."
    help_text = slack.ask("help", channel=B)["text"]
    assert "Approvers add `all` at the end" in help_text
