"""`/finetune distill` in Slack (issue 17 item 4): an approver names a label-only dataset of the
channel, an allowed teacher and its model; a runner's distill slot asks the teacher (a small real
OpenAI-compatible HTTP server here, which answers, rejects and fails for real), the thread shows
the start, the result (new dataset version, yield per label, tokens, rejected samples) or the
failure's cause, and the same command resumes from the journal without asking a finished sample
again. Refusals are private, name the parameter and queue nothing."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlmodel import select

from core.enums import JobKind, JobStatus
from runner.distill import read_journal
from storage.db import new_session
from storage.models import Dataset, Job, JobEvent
from tests.bot.conftest import (
    APPROVER,
    GROUP_MEMBER,
    deliver_all,
    ingest,
    run_queued,
    send_json,
)
from tests.runner.dataset_files import label_only_csv

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # not about the DB

TEACHER_KEY = "sk-teacher-0123456789abcdef"
WRONG = "转会"  # the teacher calls transfers 财经: their gold 体育 is never met (rejected)


class TeacherServer:
    """An OpenAI-compatible ``/v1/chat/completions`` on loopback: reasoning then a label (体育
    for sports words, else 财经), real token counts; ``fail_after`` answered requests it answers
    HTTP 503 for good (a teacher that went down)."""

    def __init__(self) -> None:
        self.asked: list[str] = []  # the text of each answered request
        self.keys: set[str] = set()
        self.tokens = 0  # the usage it reported, in all
        self.fail_after: int | None = None
        self.delay = 0.0  # seconds before each answer (past DISTILL_TIMEOUT_SECONDS: a timeout)
        self.pause = 0.0  # seconds before each answer, which then comes (a slow teacher)
        self.lock = threading.Lock()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if teacher.delay:
                    time.sleep(teacher.delay)
                    return  # the client gave up long ago
                time.sleep(teacher.pause)
                with teacher.lock:
                    teacher.keys.add(self.headers.get("Authorization", ""))
                    down = (
                        teacher.fail_after is not None and len(teacher.asked) >= teacher.fail_after
                    )
                    text = body["messages"][-1]["content"]
                    if not down:
                        teacher.asked.append(text)
                if self.path != "/v1/chat/completions" or down:
                    self.send_response(503 if down else 404)
                    self.end_headers()
                    return
                sports = any(w in text for w in ("球", "冠", "赛", "奥运", "联赛", "主场", WRONG))
                label = "财经" if WRONG in text or not sports else "体育"
                answer = f"<think>\n看关键词判断。\n</think>\n\n{label}"
                reply = {
                    "choices": [{"message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": len(text), "completion_tokens": len(answer)},
                }
                with teacher.lock:
                    teacher.tokens += len(text) + len(answer)
                send_json(self, reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.asked.clear()
            self.keys.clear()
            self.tokens = 0
            self.fail_after = None
            self.delay = 0.0
            self.pause = 0.0


@pytest.fixture(scope="module")
def teacher_server() -> Iterator[TeacherServer]:
    server = TeacherServer()
    yield server
    server.server.shutdown()


@pytest.fixture
def teacher(teacher_server: TeacherServer) -> TeacherServer:
    teacher_server.reset()
    return teacher_server


@pytest.fixture
def bot_extra_settings(tiny_model_dir: Path, teacher_server: TeacherServer) -> dict:
    return {
        "base_model": str(tiny_model_dir),
        "distill_teachers": [teacher_server.url],
        "distill_api_key": TEACHER_KEY,
        "distill_concurrency": 1,  # the failure point is deterministic
        "distill_requests_per_second": 1000,
        "distill_timeout_seconds": 0.3,
    }


def _raw(slack, engine, tmp_path: Path, *, channel: str = "C0CHAN") -> Dataset:
    return ingest(
        slack, engine, channel=channel, name="raw", source=label_only_csv(tmp_path / "raw")
    )


def _thread(slack, ts: str) -> list[str]:
    return [
        p.get("text") or ""
        for p in slack.standin.calls_to("chat.postMessage", accepted_only=True)
        if p.get("thread_ts") == ts
    ]


def _distill_jobs(engine) -> list[Job]:
    with new_session(engine) as session:
        return list(session.exec(select(Job).where(Job.kind == JobKind.distill.value)).all())


def test_refusals_are_private_name_the_parameter_and_queue_nothing(
    slack, engine, tmp_path, teacher
) -> None:
    _raw(slack, engine, tmp_path)
    ingest(slack, engine, channel="C0OTHER", name="theirs", source=label_only_csv(tmp_path / "o"))
    ingest(slack, engine, name="reasoned")  # the demo: every answer reasons already
    ok = f"dataset=raw teacher={teacher.url} model=m"
    refusals = {
        (ok, "U0USER"): "only approvers can start a distillation (it sends this channel's data",
        ("dataset=raw teacher=http://evil.example/v1 model=m", APPROVER): (
            "teacher `http://evil.example/v1` is not allowed: this deployment sends data only "
            f"to `http://127.0.0.1:8000` (our serving), `{teacher.url}` (DISTILL_TEACHERS)"
        ),
        (
            f"dataset=raw teacher={teacher.url.replace('127.0.0.1', '127.0.0.1.evil.net')} model=m",
            APPROVER,
        ): "is not allowed",
        (
            "dataset=raw teacher=ftp://h/v1 model=m",
            APPROVER,
        ): "the teacher must be an http(s) API base URL",
        (
            "dataset=raw teacher=http://u:pw@127.0.0.1:8000/v1 model=m",
            APPROVER,
        ): "without a user, password",
        (f"{ok} tries=0", APPROVER): "`tries=0`: tries takes a whole number from 1 to 10",
        (f"{ok} tries=many", APPROVER): "`tries=many`: tries takes a whole number from 1 to 10",
        (f"dataset=raw teacher={teacher.url}", APPROVER): "`/finetune distill` needs `model=`",
        (f"{ok} lr=1e-5", APPROVER): "`lr=1e-5`: `/finetune distill` takes `dataset=`, `teacher=`",
        (f"{ok} name=../x", APPROVER): "`name=../x`: dataset name '../x' is not allowed",
        (
            f"dataset=nope teacher={teacher.url} model=m",
            APPROVER,
        ): "no dataset named nope in this channel",
        (f"dataset=reasoned teacher={teacher.url} model=m", APPROVER): (
            "`dataset=reasoned`: every train answer of v1 already has its reasoning"
        ),
        (
            f"dataset=theirs teacher={teacher.url} model=m",
            APPROVER,
        ): "no dataset named theirs in this channel",
    }
    for (text, user), expected in refusals.items():
        answer = slack.ask(f"distill {text}", user=user)
        assert answer["response_type"] == "ephemeral", text
        assert expected in answer["text"], (text, answer["text"])
    usage = slack.ask("distill", user="U0USER")
    assert "`/finetune distill dataset=<name> teacher=<url> model=<name>" in usage["text"]
    assert _distill_jobs(engine) == []
    assert slack.standin.calls_to("chat.postMessage") == []  # nothing said in the channel
    assert teacher.asked == []


def test_an_approver_distills_into_a_new_dataset_version_the_channel_sees(
    slack, engine, tmp_path, teacher
) -> None:
    raw = _raw(slack, engine, tmp_path)
    assert (
        slack.command(
            f"distill dataset=raw teacher={teacher.url} model=teach tries=2", user=GROUP_MEMBER
        ).status_code
        == 200
    )
    [root] = slack.standin.wait_for("chat.postMessage")
    assert root["text"] == "Distillation job 1 queued"
    thread = slack.wait_for_thread(engine, 1)
    [job] = _distill_jobs(engine)
    assert job.config == {"teacher": teacher.url, "model": "teach", "tries": 2}
    assert job.dataset_id == raw.id and job.requested_by == GROUP_MEMBER
    again = slack.ask(f"distill dataset=raw teacher={teacher.url}/ model=teach", user=APPROVER)
    assert again["response_type"] == "ephemeral"
    assert (
        "is being distilled by this teacher already: distillation job 1 is queued"
        in (again["text"])
    )  # one at a time: they would share a journal

    done = _run_in_a_runner(slack, engine, job.id)
    assert done.status == JobStatus.succeeded, done.error
    assert teacher.keys == {f"Bearer {TEACHER_KEY}"}  # the setting's key, never the command's
    assert len(teacher.asked) == 10 + 1  # the transfer headline asked twice, then rejected
    deliver_all(slack, engine)
    started, result = _thread(slack, thread)
    assert started.startswith(":test_tube: Distilling *raw* v1 (10 train samples) with `teach`")
    assert result.splitlines()[:4] == [
        ":white_check_mark: Dataset *raw-distilled* v1 stored: 9 of 10 samples kept (90%), 2 "
        "eval samples copied unchanged.",
        "• Rejected: 1 samples (the teacher's label was not the gold one in 2 tries)",
        "• Yield per label: 体育 5/6 (83%) · 财经 4/4 (100%)",
        f"• Teacher: 11 requests, {teacher.tokens:,} tokens ({teacher.tokens:,} in this run)",
    ]
    header = slack.standin.calls_to("chat.update")[-1]
    assert header["ts"] == thread
    assert "Distillation job 1: succeeded" in header["text"]
    assert "10/10 samples done · 9 kept" in json.dumps(header["blocks"], ensure_ascii=False)

    datasets = slack.ask("datasets")["text"]
    assert "*raw-distilled* v1 · 9 train / 2 eval · 2 labels" in datasets
    assert "this channel's" in datasets.split("raw-distilled", 1)[1].splitlines()[0]
    everything = json.dumps(slack.standin.calls, default=str) + json.dumps(_events(engine))
    assert TEACHER_KEY not in everything  # the key is in no message, event or job


def _run_in_a_runner(slack, engine, job_id: int) -> Job:
    """The runner's own loop: its distill slot claims the job and runs it in a child process."""
    from runner.worker import Runner

    runner = Runner(slack.settings, owner="host:1", devices=[])
    assert [s.name for s in runner.slots] == ["dataset checks", "distillations"]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runner.poll()
            with new_session(engine) as session:
                job = session.get(Job, job_id)
                if job is not None and JobStatus(job.status).finished:
                    return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish")
    finally:
        runner.shutdown()


def _events(engine) -> list[dict]:
    with new_session(engine) as session:
        rows = session.exec(select(JobEvent)).all()
        return [{"kind": e.kind, **e.payload} for e in rows] + [
            {"config": j.config, "error": j.error} for j in session.exec(select(Job)).all()
        ]


def test_a_teacher_that_fails_part_way_loses_nothing_and_the_same_command_resumes(
    slack, engine, tmp_path, teacher
) -> None:
    _raw(slack, engine, tmp_path)
    command = f"distill dataset=raw teacher={teacher.url} model=teach tries=2"
    teacher.fail_after = 4  # four answers, then HTTP 503 for good
    slack.command(command, user=APPROVER)
    thread = slack.wait_for_thread(engine, 1)
    [failed] = run_queued(slack, engine, JobKind.distill)
    assert failed.status == JobStatus.failed
    assert failed.error == (
        f"the teacher at {teacher.url} failed (HTTP 503). 4 of 10 samples are done and kept; "
        f"the same command resumes with the rest: `/finetune distill dataset=raw "
        f"teacher={teacher.url} model=teach tries=2`"
    )
    deliver_all(slack, engine)
    assert _thread(slack, thread)[-1] == f":x: Failed: {failed.error}"
    with new_session(engine) as session:
        assert session.exec(select(Dataset).where(Dataset.name == "raw-distilled")).first() is None

    teacher.fail_after = None  # the teacher is back: the same command
    slack.command(command, user=APPROVER)
    second = slack.wait_for_thread(engine, 2)
    [done] = run_queued(slack, engine, JobKind.distill)
    assert done.status == JobStatus.succeeded, done.error
    asked = Counter(teacher.asked)
    assert len(asked) == 10  # every sample asked, none lost
    assert [n for text, n in asked.items() if WRONG not in text] == [1] * 9  # none asked again
    deliver_all(slack, engine)
    started, result = _thread(slack, second)
    assert "4 already done (kept from an earlier run), resuming with the rest" in started
    assert "9 of 10 samples kept" in result
    [event] = [e for e in _events(engine) if e.get("kind") == "distilled"]
    journal = read_journal(next((Path(slack.settings.artifact_dir) / "distill").glob("*.jsonl")))
    assert sorted(journal) == list(range(10))  # one row a sample: none duplicated
    assert event["asked_now"] == 6 and event["tokens_now"] < event["tokens"]


def test_a_teacher_that_times_out_is_named_so_in_the_thread(slack, engine, tmp_path, teacher):
    _raw(slack, engine, tmp_path)
    teacher.delay = 1.0
    slack.command(f"distill dataset=raw teacher={teacher.url} model=teach", user=APPROVER)
    thread = slack.wait_for_thread(engine, 1)
    [failed] = run_queued(slack, engine, JobKind.distill)
    assert failed.status == JobStatus.failed
    assert failed.error.startswith(
        f"the teacher at {teacher.url} timed out (no answer within DISTILL_TIMEOUT_SECONDS, "
        "0.3 s). 0 of 10 samples are done and kept; the same command resumes with the rest"
    )
    deliver_all(slack, engine)
    assert _thread(slack, thread)[-1] == f":x: Failed: {failed.error}"


def test_cancel_stops_a_running_distillation_and_keeps_what_it_finished(
    slack, engine, tmp_path, teacher
) -> None:
    _raw(slack, engine, tmp_path)
    teacher.pause = 0.25  # cancel is polled once a second: it lands part way
    slack.command(f"distill dataset=raw teacher={teacher.url} model=teach", user=APPROVER)
    thread = slack.wait_for_thread(engine, 1)

    def cancel_once_asked() -> None:
        while len(teacher.asked) < 2:
            time.sleep(0.02)
        assert (
            "asked to stop; it asks the teacher nothing more"
            in slack.ask("cancel 1", user=APPROVER)["text"]
        )

    canceller = threading.Thread(target=cancel_once_asked)
    canceller.start()
    [stopped] = run_queued(slack, engine, JobKind.distill)
    canceller.join(10)
    assert stopped.status == JobStatus.cancelled
    assert len(teacher.asked) < 10  # it stopped asking
    deliver_all(slack, engine)
    [reply] = [t for t in _thread(slack, thread) if t.startswith(":no_entry_sign: Cancelled")]
    journal = read_journal(next((Path(slack.settings.artifact_dir) / "distill").glob("*.jsonl")))
    assert 0 < len(journal) < 10
    assert f"{len(journal)} of 10 samples are done and kept" in reply
    assert "`/finetune distill dataset=raw" in reply and reply.endswith("resumes")
