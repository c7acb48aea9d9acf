"""One relay at a time: two bot processes (a rolling deploy) never post the same event twice; the
one standing by takes over when the relaying one exits, dies, or loses its lock connection."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

from storage.db import make_engine, new_session
from storage.jobs import add_job_event
from tests.bot import test_notifier as story
from tests.bot.test_notifier import (
    _assert_whole_story,
    _pending,
    _run_a_job,
    _thread_texts,
)
from tests.conftest import REPO

notifiers = story.notifiers  # the fixture


def _say(engine, job_id: int, message: str) -> None:
    with new_session(engine) as session:
        add_job_event(session, job_id=job_id, kind="status", message=message)
        session.commit()


def test_two_notifiers_on_one_database_post_every_message_once(slack, engine, notifiers) -> None:
    job = _run_a_job(slack, engine)
    slack.standin.inject("chat.postMessage", status=429, retry_after=1, times=2)  # several rounds
    second_engine = make_engine(slack.settings.db_url)  # as another process would
    first = notifiers(time.monotonic)
    second = notifiers(time.monotonic, db=second_engine)
    delivered = {"first": 0, "second": 0}

    def relay(name: str, notifier) -> None:
        deadline = time.monotonic() + 20
        while _pending(engine) and time.monotonic() < deadline:
            delivered[name] += notifier.deliver_pending()
            time.sleep(0.05)

    threads = [
        threading.Thread(target=relay, args=("first", first)),
        threading.Thread(target=relay, args=("second", second)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _assert_whole_story(slack, engine, job)  # each message once
    assert sorted(delivered.values())[0] == 0  # one of them stood by all along
    standby = second if delivered["second"] == 0 else first
    relaying = first if standby is second else second
    _say(engine, job.id, "after the deploy")
    assert standby.deliver_pending() == 0
    relaying.close()  # the old process exits
    assert standby.deliver_pending() == 1
    assert _thread_texts(slack, job).count("after the deploy") == 1
    second_engine.dispose()


HOLD_THE_LOCK = textwrap.dedent(
    """
    import sys, time
    from storage.db import make_engine
    from storage.outbox import relay_lock
    lock = relay_lock(make_engine(sys.argv[1]))
    print("held" if lock.acquire() else "not held", flush=True)
    time.sleep(600)
    """
)


def test_a_notifier_takes_over_when_the_relaying_process_dies(slack, engine, notifiers) -> None:
    job = _run_a_job(slack, engine)
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, slack.settings.db_url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        notifier = notifiers()
        assert notifier.deliver_pending() == 0  # stands by: the other process relays
        assert _thread_texts(slack, job) == []
    finally:
        other.kill()  # SIGKILL: no chance to let go; the kernel / the server drops the lock
        other.wait()
    deadline = time.monotonic() + 10
    while _pending(engine) and time.monotonic() < deadline:
        notifier.deliver_pending()
        time.sleep(0.1)
    _assert_whole_story(slack, engine, job)
