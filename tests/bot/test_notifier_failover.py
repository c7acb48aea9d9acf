"""PostgreSQL: a notifier whose lock connection died (a network blip, the server restarted, an
operator ended it) notices at its next round and stops relaying; the one standing by takes over."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, text

from storage.db import make_engine
from storage.outbox import NOTIFIER_LOCK_KEY
from tests.bot import test_notifier as story
from tests.bot.test_notifier import _job, _run_a_job, _thread_texts
from tests.bot.test_notifier_relay import _say

notifiers = story.notifiers  # the fixture


@pytest.fixture
def db_url(postgres_url: str) -> str:
    """Advisory locks are PostgreSQL's: this module runs on PostgreSQL only."""
    return postgres_url


def test_a_notifier_whose_lock_connection_died_stops_relaying(
    slack, engine, notifiers, db_url
) -> None:
    job = _run_a_job(slack, engine)
    first, second = notifiers(), notifiers(db=make_engine(db_url))
    assert first.deliver_pending() > 0 and second.deliver_pending() == 0
    admin = create_engine(db_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:  # the server ends first's lock connection
        ended = connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND objid = :low AND granted "
                # this test's database only: another test's notifier holds the same key in its own
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"low": NOTIFIER_LOCK_KEY & 0xFFFFFFFF},
        ).all()
    admin.dispose()
    assert ended == [(True,)]
    _say(engine, job.id, "after the failover")
    time.sleep(0.2)
    assert second.deliver_pending() == 1  # the lock was free: the stand-by took it
    assert first.deliver_pending() == 0  # checked its lock, found it gone, stands by now
    _say(engine, job.id, "and later")
    assert first.deliver_pending() == 0 and second.deliver_pending() == 1
    texts = _thread_texts(slack, _job(engine, job.id))
    assert texts.count("after the failover") == texts.count("and later") == 1
