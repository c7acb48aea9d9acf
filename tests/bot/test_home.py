"""The App Home over signed HTTP against the stand-in, SQLite and PostgreSQL: what a requester and
an approver see (and what they do not: another channel's jobs), Promote and Cancel checked on the
server, the start form from the home, Slack refusing or rate-limiting views.publish, and the
notifier republishing a home when a job changes state, paced."""

from __future__ import annotations

import json
import time

import pytest
from sqlmodel import col, select

from bot.home import HomeRefresher
from bot.home_blocks import CANCEL_JOB, NEW_JOB, PROMOTE, Board, HomeData, Viewer, home_view
from bot.notifier import Notifier, relay_client
from bot.standin import _view_refusal, home_action_body, home_opened_body, view_submission_body
from core.enums import CheckpointStatus, JobStatus
from storage.artifacts import ArtifactStore
from storage.db import new_session
from storage.jobs import add_job_event, claim_next_job
from storage.models import Checkpoint, Dataset, Evaluation, Job, Promotion
from tests.bot.conftest import APPROVER, ingest

A, B = "C0ALPHA", "C0BRAVO"
USER, OTHER = "U0USER", "U0OTHER"


def _start(slack, engine, *, user: str, channel: str) -> Job:
    before = len(slack.standin.calls_to("chat.postMessage"))
    slack.command("start lr=5e-6", user=user, channel=channel)
    slack.standin.wait_for("chat.postMessage", before + 1)
    with new_session(engine) as session:
        job = session.exec(
            select(Job).where(Job.requested_by == user).order_by(col(Job.id).desc())
        ).first()
    assert job is not None
    slack.wait_for_thread(engine, job.id)
    return job


def _checkpoint(engine, job: Job, *, accuracy: float | None) -> int:
    with new_session(engine) as session:
        checkpoint = Checkpoint(job_id=job.id, step=8, final=True, path="c/8", base_model="tiny")
        session.add(checkpoint)
        session.flush()
        if accuracy is not None:
            session.add(
                Evaluation(
                    checkpoint_id=checkpoint.id,
                    dataset_id=job.dataset_id,
                    base_model="tiny",
                    metrics={"accuracy": accuracy, "macro_f1": accuracy - 0.05, "ece": 0.04},
                )
            )
        session.commit()
        return checkpoint.id


def _home(slack, user: str, *, click: tuple[str, str] | None = None) -> dict:
    """``user`` opens their home (or clicks ``click`` = (action, value) in it): the view the bot
    published for them next."""
    before = len(slack.standin.calls_to("views.publish"))
    if click is None:
        body = home_opened_body(user, event_id=f"Ev{user}{before}{time.monotonic_ns()}")
        response = slack.post(body, content_type="application/json")
    else:
        response = slack.post(home_action_body(click[0], click[1], user_id=user))
    assert response.status_code == 200
    published = slack.standin.wait_for("views.publish", before + 1)[before]
    assert published["user_id"] == user
    return published["view"]


def _text(view: dict) -> str:
    return "\n".join(
        b["text"]["text"] for b in view["blocks"] if b["type"] in ("section", "header")
    ) + "\n".join(
        e["text"] for b in view["blocks"] if b["type"] == "context" for e in b["elements"]
    )


def _buttons(view: dict) -> list[tuple[str, str]]:
    found = []
    for block in view["blocks"]:
        elements = block.get("elements", []) if block["type"] == "actions" else []
        elements += [block["accessory"]] if "accessory" in block else []
        found += [(e["action_id"], e["value"]) for e in elements if e["type"] == "button"]
    return found


@pytest.fixture
def world(slack, engine) -> dict:
    """U0USER's job in A with an evaluated checkpoint, which serves; U0OTHER's job in B with an
    evaluated checkpoint and an unevaluated one; both jobs still queued."""
    ingest(slack, engine, channel=A)
    ingest(slack, engine, channel=B)
    mine = _start(slack, engine, user=USER, channel=A)
    theirs = _start(slack, engine, user=OTHER, channel=B)
    my_checkpoint = _checkpoint(engine, mine, accuracy=0.9)
    their_checkpoint = _checkpoint(engine, theirs, accuracy=0.7)
    unscored = _checkpoint(engine, theirs, accuracy=None)
    with new_session(engine) as session:
        session.add(Promotion(checkpoint_id=my_checkpoint, action="promote", decided_by=APPROVER))
        checkpoint = session.get(Checkpoint, my_checkpoint)
        checkpoint.status, checkpoint.decided_by = CheckpointStatus.promoted.value, APPROVER
        session.add(checkpoint)
        session.commit()
    return {
        "mine": mine.id,
        "theirs": theirs.id,
        "my_checkpoint": my_checkpoint,
        "their_checkpoint": their_checkpoint,
        "unscored": unscored,
    }


def test_a_requesters_home_shows_their_own_and_no_other_channels(slack, engine, world) -> None:
    view = _home(slack, USER)
    text = _text(view)
    assert view["type"] == "home"
    assert f"*Serving now:* checkpoint {world['my_checkpoint']} · accuracy 90.0%" in text
    assert "promoted by <@U0APPROVER>" in text
    assert f"*Fine-tuning job {world['mine']}* · queued" in text
    assert (
        f"1. *checkpoint {world['my_checkpoint']}* · promoted · :arrow_forward: *serving now*"
        in (text)
    )
    assert "accuracy 90.0% · macro-F1 85.0% · ECE 4.0%" in text
    assert "learning_rate=5e-06" in text and "*news* v1" in text
    # Nothing of B: not U0OTHER's job, not its checkpoints, not the channel.
    assert f"job {world['theirs']}" not in text.lower() and B not in text and OTHER not in text
    assert f"checkpoint {world['their_checkpoint']}" not in text
    # Cancel on their own job, no Promote (not an approver), the start form's button.
    assert _buttons(view) == [(NEW_JOB, "start"), (CANCEL_JOB, str(world["mine"]))]


def test_an_approvers_home_shows_every_channel_with_promote(slack, engine, world) -> None:
    view = _home(slack, APPROVER)
    text = _text(view)
    assert f"*Fine-tuning job {world['theirs']}* · queued" in text and f"<#{B}>" in text
    assert "every channel's" in text
    buttons = _buttons(view)
    assert (CANCEL_JOB, str(world["mine"])) in buttons
    assert (CANCEL_JOB, str(world["theirs"])) in buttons
    board = [b["text"]["text"].split("\n")[0] for b in view["blocks"] if "checkpoint " in str(b)]
    assert [line.split(" · ")[0] for line in board if "*checkpoint" in line] == [
        f"1. *checkpoint {world['my_checkpoint']}*",  # macro-F1 85%
        f"2. *checkpoint {world['their_checkpoint']}*",  # 65%
        f"*checkpoint {world['unscored']}*",  # never evaluated: last, no rank
    ]
    # Promote only on the evaluated candidate: not the serving one, not the unevaluated one.
    assert [v for a, v in buttons if a == PROMOTE] == [str(world["their_checkpoint"])]
    promote = next(
        b["accessory"] for b in view["blocks"] if b.get("accessory", {}).get("action_id") == PROMOTE
    )
    assert promote["confirm"]["confirm"]["text"] == "Promote"  # a confirm dialog first


def test_a_non_approver_clicking_promote_in_the_home_is_refused(slack, engine, world) -> None:
    view = _home(slack, OTHER, click=(PROMOTE, str(world["their_checkpoint"])))
    assert view["blocks"][0]["text"]["text"] == (
        ":lock: Only approvers can promote or reject a checkpoint; nothing was changed."
    )
    with new_session(engine) as session:
        assert session.get(Checkpoint, world["their_checkpoint"]).status == "candidate"
        assert len(session.exec(select(Promotion)).all()) == 1
    assert not slack.standin.calls_to("chat.postEphemeral")  # told in the home, not a channel


def test_an_approver_promoting_an_unevaluated_checkpoint_from_the_home_is_refused(
    slack, engine, world
) -> None:
    view = _home(slack, APPROVER, click=(PROMOTE, str(world["unscored"])))
    notice = view["blocks"][0]["text"]["text"]
    assert f"checkpoint {world['unscored']} was never evaluated" in notice
    assert f"`/finetune promote {world['unscored']} force`" in notice
    view = _home(slack, APPROVER, click=(PROMOTE, str(world["my_checkpoint"])))
    assert "already promoted by <@U0APPROVER>" in view["blocks"][0]["text"]["text"]
    with new_session(engine) as session:
        assert len(session.exec(select(Promotion)).all()) == 1


def test_cancel_in_the_home_is_for_the_requester_and_approvers(slack, engine, world) -> None:
    mine, theirs = str(world["mine"]), str(world["theirs"])
    refused = _home(slack, OTHER, click=(CANCEL_JOB, mine))  # another channel's: not even seen
    assert refused["blocks"][0]["text"]["text"] == (
        f":warning: No job {mine} here; nothing was changed."
    )
    with new_session(engine) as session:  # a deployment job U0USER started: seen, not theirs
        running = Job(
            base_model="tiny", requested_by=USER, channel_id=None, status="running", config={}
        )
        session.add(running)
        session.commit()
        deployment_job = str(running.id)
    refused = _home(slack, OTHER, click=(CANCEL_JOB, deployment_job))
    assert "only <@U0USER> (who started job" in refused["blocks"][0]["text"]["text"]

    done = _home(slack, USER, click=(CANCEL_JOB, mine))
    assert done["blocks"][0]["text"]["text"] == f":octagonal_sign: Job {mine} cancelled."
    assert f"*Fine-tuning job {mine}*" not in _text(done)  # no longer running or queued
    stopped = _home(slack, APPROVER, click=(CANCEL_JOB, theirs))
    assert f"Job {theirs} cancelled" in stopped["blocks"][0]["text"]["text"]
    with new_session(engine) as session:
        assert session.get(Job, int(mine)).status == JobStatus.cancelled
        assert session.get(Job, int(theirs)).status == JobStatus.cancelled
        assert session.get(Job, int(deployment_job)).status == JobStatus.running


def test_new_fine_tune_opens_the_start_form_for_the_users_channels(slack, engine, world) -> None:
    response = slack.post(home_action_body(NEW_JOB, "start", user_id=USER))
    assert response.status_code == 200
    [opened] = slack.standin.wait_for("views.open")
    view = opened["view"]
    assert view["callback_id"] == "start_job"
    fields = {b["block_id"]: b for b in view["blocks"]}
    assert fields["channel"]["element"]["initial_conversation"] == A
    assert [o["text"]["text"] for o in fields["dataset"]["element"]["options"]] == ["news v1"]

    def submit(channel: str) -> dict:
        with new_session(engine) as session:
            dataset = session.exec(select(Dataset).where(Dataset.channel_id == A)).one()
        values = {
            "channel": {"value": {"selected_conversation": channel}},
            "dataset": {"value": {"selected_option": {"value": str(dataset.id)}}},
        }
        body = view_submission_body(
            "start_job", values, user_id=USER, private_metadata=view["private_metadata"]
        )
        answer = slack.post(body)
        assert answer.status_code == 200
        return answer.json() if answer.content else {}

    refused = submit(B)  # a channel the bot does not know them to be in
    assert refused["response_action"] == "errors"
    assert "You have not started a job" in refused["errors"]["channel"]
    before = len(slack.standin.calls_to("chat.postMessage"))
    assert submit(A) == {}
    [root] = slack.standin.wait_for("chat.postMessage", before + 1)[before:]
    assert root["channel"] == A and "queued" in root["text"]


def test_views_publish_refused_or_rate_limited_is_handled(slack, engine, world, caplog) -> None:
    slack.standin.inject("views.publish", error="invalid_arguments")
    refused = _home(slack, USER)
    [view] = slack.standin.wait_for("views.publish", 2)[1:]  # published again as plain text
    view = view["view"]
    assert len(refused["blocks"]) > 1
    assert len(view["blocks"]) == 1
    assert "could not be shown (Slack answered `invalid_arguments`)" in _text(view)
    assert "Slack refused U0USER's home (invalid_arguments" in caplog.text

    # 429 twice: the listener's client waits Retry-After and retries once, then gives up.
    before = len(slack.standin.calls_to("views.publish"))
    accepted = len(slack.standin.calls_to("views.publish", accepted_only=True))
    slack.standin.inject("views.publish", status=429, retry_after=1, times=2)
    slack.post(home_opened_body(USER, event_id="EvLimited"), content_type="application/json")
    slack.standin.wait_for("views.publish", before + 2)
    deadline = time.monotonic() + 5
    while "home was not published: rate limited" not in caplog.text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(slack.standin.calls_to("views.publish", accepted_only=True)) == accepted
    assert _home(slack, USER)["blocks"][0]["text"]["text"].startswith("*Serving now:*")


def test_the_messages_tab_publishes_nothing(slack, engine) -> None:
    body = home_opened_body(USER, event_id="EvMessages", tab="messages")
    assert slack.post(body, content_type="application/json").status_code == 200
    time.sleep(0.3)
    assert not slack.standin.calls_to("views.publish")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _refresher(slack, engine, clock: Clock) -> HomeRefresher:
    """The notifier's refresher, knowing who opened their home in the bot under test."""
    from bot.auth import Approvers

    client = relay_client(slack.standin.bot_token, slack.settings.slack_api_url)
    return HomeRefresher(
        engine,
        client,
        Approvers([APPROVER], client),
        "tiny",
        interval=10,
        clock=clock,
        viewers=slack.home_viewers,
    )


def test_homes_are_republished_paced_and_wait_out_rate_limits(slack, engine) -> None:
    clock = Clock()
    homes = _refresher(slack, engine, clock)
    for _ in range(3):
        homes.note(USER)
    assert homes.flush() == 1 and homes.flush() == 0  # one publish for three changes
    homes.note(USER)
    clock.now += 5
    assert homes.flush() == 0  # inside the interval: it waits
    clock.now += 5
    assert homes.flush() == 1  # and the last state goes out

    slack.standin.inject("views.publish", status=429, retry_after=30)
    homes.note(USER)
    homes.note(APPROVER)
    clock.now += 10
    assert homes.flush() == 0  # rate limited: every home waits 30 s
    clock.now += 20
    assert homes.flush() == 0
    clock.now += 11
    assert homes.flush() == 2
    published = slack.standin.calls_to("views.publish", accepted_only=True)
    assert [p["user_id"] for p in published] == [USER, USER, APPROVER, USER]

    slack.standin.inject("views.publish", error="invalid_arguments", times=2)
    homes.note(USER)
    clock.now += 10
    assert homes.flush() == 0  # refused even as plain text: given up, not retried forever
    clock.now += 10
    assert homes.flush() == 0


def test_the_notifier_republishes_the_requesters_home_when_a_job_changes_state(
    slack, engine
) -> None:
    ingest(slack, engine, channel=A)
    job = _start(slack, engine, user=USER, channel=A)
    clock = Clock()
    notifier = Notifier(
        engine,
        relay_client(slack.standin.bot_token, slack.settings.slack_api_url),
        ArtifactStore(slack.settings.artifact_dir),
        channel_interval=0.0,
        clock=clock,
        homes=_refresher(slack, engine, clock),
    )
    try:
        notifier.deliver_pending()  # "queued"
        [first] = slack.standin.calls_to("views.publish")
        assert first["user_id"] == USER and f"Fine-tuning job {job.id}* · queued" in _text(
            first["view"]
        )
        with new_session(engine) as session:
            claim_next_job(session, owner="r", lease_seconds=60)  # "claimed": running
        notifier.deliver_pending()
        assert len(slack.standin.calls_to("views.publish")) == 1  # paced
        clock.now += 10
        notifier.deliver_pending()
        second = slack.standin.calls_to("views.publish")[1]
        assert f"Fine-tuning job {job.id}* · running" in _text(second["view"])
    finally:
        notifier.close()


def test_a_full_home_fits_slacks_limits() -> None:
    viewer = Viewer(APPROVER, True)
    jobs = [
        (
            Job(id=i, base_model="m", status="running", error="x" * 5000, config={"k": "v" * 4000}),
            None,
        )
        for i in range(40)
    ]
    dataset = Dataset(
        id=1, name="n" * 64, version=1, format="alpaca", train_samples=1, eval_samples=1
    )
    board = [
        Board(
            Checkpoint(id=i, job_id=i, step=1, path="p", base_model="m"),
            Job(id=i, base_model="m", config={"k": "v" * 4000}, channel_id=A),
            dataset,
            {"accuracy": 0.5, "macro_f1": 0.5},
        )
        for i in range(30)
    ]
    data = HomeData(
        base_model="m" * 300,
        promotion=None,
        serving_metrics=None,
        serving_visible=True,
        active=jobs,
        board=board,
    )
    view = home_view(data, viewer, notice="n" * 5000)
    assert _view_refusal(view) is None
    assert json.dumps(view)  # plain data


def test_a_job_change_pushes_every_open_home_that_shows_the_job_paced(slack, engine) -> None:
    ingest(slack, engine, channel=A)
    ingest(slack, engine, channel=B)
    for user in (USER, OTHER, APPROVER):  # each opens their home in Slack once
        _home(slack, user)
    opened = len(slack.standin.calls_to("views.publish"))
    clock = Clock()
    notifier = Notifier(
        engine,
        relay_client(slack.standin.bot_token, slack.settings.slack_api_url),
        ArtifactStore(slack.settings.artifact_dir),
        channel_interval=0.0,
        clock=clock,
        homes=_refresher(slack, engine, clock),
    )

    def pushed() -> dict[str, str]:
        """Whose homes were published since the last look: user → its text."""
        nonlocal opened
        published = slack.standin.calls_to("views.publish")[opened:]
        opened += len(published)
        return {p["user_id"]: _text(p["view"]) for p in published}

    try:
        mine = _start(slack, engine, user=USER, channel=A)
        notifier.deliver_pending()  # "queued": the requester's home and the approver's
        homes = pushed()
        assert set(homes) == {USER, APPROVER}  # not U0OTHER's: A's job is not in their home
        assert f"*Fine-tuning job {mine.id}* · queued" in homes[APPROVER]

        theirs = _start(slack, engine, user=OTHER, channel=B)
        notifier.deliver_pending()
        assert set(pushed()) == {OTHER}  # the approver's waits: pushed 0 s ago
        clock.now += 10
        notifier.deliver_pending()
        homes = pushed()
        assert (
            set(homes) == {APPROVER}
            and f"*Fine-tuning job {theirs.id}* · queued" in (homes[APPROVER])
        )

        with new_session(engine) as session:  # a deployment job: every open home shows it
            job = Job(base_model="tiny", status="queued", config={})
            session.add(job)
            session.commit()
            add_job_event(session, job_id=job.id, kind="queued")
            session.commit()
        clock.now += 10
        notifier.deliver_pending()
        assert set(pushed()) == {USER, OTHER, APPROVER}
    finally:
        notifier.close()
