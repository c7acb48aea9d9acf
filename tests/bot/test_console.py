"""The console: typed lines through the same app, answers printed as text, buttons as numbers."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import select

from bot.console import Console
from core.enums import CheckpointStatus, JobKind, JobStatus
from core.settings import Settings
from runner.job import run_job
from storage.db import new_session
from storage.jobs import add_job_event, claim_next_job, set_job_state
from storage.models import Checkpoint, Job
from tests.conftest import install_pretrained_tiny_model
from tests.runner import dataset_files as files


@pytest.fixture
def console(
    engine, settings: Settings, pretrained_tiny_model: Path
) -> Iterator[tuple[Console, io.StringIO]]:
    # The dataset check measures token lengths with the base model's (tiny's) tokenizer: the
    # session's build, copied, rather than a build of its own.
    install_pretrained_tiny_model(pretrained_tiny_model, settings)
    out = io.StringIO()
    console = Console(settings, out=out)
    yield console, out
    console.close()


def _said(console: Console, out: io.StringIO, line: str) -> str:
    start = len(out.getvalue())
    assert console.handle(line)
    console.show_new(settle=0.4)
    return out.getvalue()[start:]


def test_a_session_in_the_console(console, engine, tmp_path) -> None:
    console, out = console
    assert "`/finetune start [dataset=<name>]" in _said(console, out, "/finetune help")
    archive = files.tutorial_zip(tmp_path / "data_news_300.zip")
    said = _said(console, out, f"upload {archive}")
    assert "#channel: :mag: Dataset check 1: checking `data_news_300.zip`…" in said
    with new_session(engine) as session:  # a runner's dataset-check slot, with its own code
        check = claim_next_job(session, owner="r", lease_seconds=60, kinds=[JobKind.ingest])
    run_job(check.id, check.lease_token, console.settings)
    time.sleep(2.5)  # the notifier's round
    said = _said(console, out, "")
    assert "↳ :inbox_tray: Dataset *data_news_300* v1 stored" in said
    assert "↳ Validation report:" in said
    said = _said(console, out, "/finetune start lr=5e-6 grad_accum=2")
    assert "#channel: :hourglass_flowing_sand: *Fine-tuning job 2* · queued" in said

    deadline = time.monotonic() + 10  # the runner's side, with the runner's functions
    with new_session(engine) as session:
        while (job := claim_next_job(session, owner="r", lease_seconds=60)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        checkpoint = Checkpoint(
            job_id=job.id, step=1, final=True, path="checkpoints/c", base_model="tiny"
        )
        session.add(checkpoint)
        session.commit()
        add_job_event(
            session,
            job_id=job.id,
            kind="evaluated",
            checkpoint_id=checkpoint.id,
            report_path="evals/none",
            accuracy=0.8,
            macro_f1=0.75,
            invalid_rate=0.0,
            truncated_rate=0.0,
            vs_base=None,
            vs_promoted=None,
        )
        session.commit()
        set_job_state(session, job_id=job.id, token=job.lease_token, status=JobStatus.succeeded)
    time.sleep(2.5)  # the notifier's round
    said = _said(console, out, "")
    assert "Evaluation of checkpoint 1" in said and "[1] Approve & promote  [2] Reject" in said
    said = _said(console, out, "2")
    assert "(updated) " in said and "Rejected by <@U0CONSOLE>" in said
    with new_session(engine) as session:
        assert session.exec(select(Checkpoint)).one().status == CheckpointStatus.rejected
    assert not console.handle("quit")


def test_the_home_in_the_console(console, engine) -> None:
    console, out = console
    said = _said(console, out, "home")
    assert "(home) *Serving now:* the base model" in said
    assert "*Running and queued*" in said and "Nothing is running or queued." in said
    assert "[1] New fine-tune" in said
    with new_session(engine) as session:
        job = Job(base_model="tiny", requested_by="U0CONSOLE", channel_id="C0CONSOLE", config={})
        session.add(job)
        session.commit()
    said = _said(console, out, "home")
    assert "*Fine-tuning job 1* · queued" in said and "by <@U0CONSOLE> in <#C0CONSOLE>" in said
    assert "[3] Cancel" in said
    said = _said(console, out, "3")  # the console's user is its approver
    assert "(home) :octagonal_sign: Job 1 cancelled." in said
    with new_session(engine) as session:
        assert session.get(Job, 1).status == JobStatus.cancelled


def test_a_second_console_session_on_the_same_database_gets_its_uploads_checked(
    console, settings: Settings, tmp_path
) -> None:
    """The bot drops an event id it has seen (Slack's retries), and the database keeps them:
    a console started again on the same ./var must not reuse the last session's ids, or its
    first upload (and its first Home) would be dropped as a retry."""
    console, out = console
    first = _said(console, out, f"upload {files.tutorial_zip(tmp_path / 'a.zip')}")
    assert "Dataset check 1: checking `a.zip`" in first
    assert "(home) *Serving now:*" in _said(console, out, "home")
    console.close()
    again = Console(settings, out=io.StringIO())  # the next `finetune-bot` on the same ./var
    try:
        said = _said(again, again.out, f"upload {files.tutorial_zip(tmp_path / 'b.zip')}")
        assert "Dataset check 2: checking `b.zip`" in said
        assert "(home) *Serving now:*" in _said(again, again.out, "home")
    finally:
        again.close()
