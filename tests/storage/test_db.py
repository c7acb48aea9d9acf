"""Schema, migrations and data access on SQLite and PostgreSQL (each test runs on both)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel, select

from core.errors import ConfigError
from storage.datasets import create_dataset, get_dataset, latest_dataset
from storage.db import make_engine, new_session
from storage.migrate import check_schema, downgrade, head_revision, upgrade
from storage.models import Job, JobEvent

TABLES = {
    "datasets",
    "jobs",
    "sweeps",
    "job_events",
    "checkpoints",
    "evaluations",
    "promotions",
    "audit_log",
    "slack_events",
    "feedback",
    "alembic_version",
}


def test_migrations_create_exactly_the_modelled_schema(engine) -> None:
    assert set(inspect(engine).get_table_names()) == TABLES
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, SQLModel.metadata) == []


def test_downgrade_to_base_and_upgrade_again(db_url: str) -> None:
    upgrade(db_url)
    downgrade(db_url, "base")
    engine = make_engine(db_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(db_url)
    assert set(inspect(engine).get_table_names()) == TABLES
    engine.dispose()


def test_check_schema_refuses_an_unmigrated_database(db_url: str) -> None:
    engine = make_engine(db_url)
    with pytest.raises(ConfigError, match="python -m storage migrate"):
        check_schema(engine)
    upgrade(db_url)
    check_schema(engine)
    engine.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'nested' / 'x.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


def test_foreign_keys_are_enforced(engine) -> None:
    with new_session(engine) as session:
        session.add(JobEvent(job_id=12345, kind="progress"))
        with pytest.raises(IntegrityError):
            session.commit()


def test_datetimes_come_back_timezone_aware_utc(engine) -> None:
    started = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    with new_session(engine) as session:
        job = Job(base_model="tiny", started_at=started, config={"lr": 5e-6})
        session.add(job)
        session.commit()
        job_id = job.id
    with new_session(engine) as session:
        loaded = session.get(Job, job_id)
        assert loaded is not None
        assert loaded.started_at == started and loaded.started_at.tzinfo is not None
        assert loaded.created_at.tzinfo is not None
        assert loaded.config == {"lr": 5e-6}


def _dataset_fields(name: str, channel: str | None = None) -> dict:
    return {
        "name": name,
        "source_name": "x.json",
        "format": "sharegpt",
        "train_sha256": "0" * 64,
        "train_samples": 3,
        "labels": ["体育", "财经"],
        "channel_id": channel,
    }


def test_dataset_versions_count_up_per_name(engine) -> None:
    with new_session(engine) as session:
        first = create_dataset(session, **_dataset_fields("news", "C1"))
        second = create_dataset(session, **_dataset_fields("news", "C1"))
        other = create_dataset(session, **_dataset_fields("other", "C2"))
        session.commit()
        assert (first.version, second.version, other.version) == (1, 2, 1)
        assert get_dataset(session, name="news").id == second.id
        assert get_dataset(session, name="news", version=1).id == first.id
        assert latest_dataset(session, channel_id="C1").id == second.id
        assert get_dataset(session, name="missing") is None
        loaded = session.exec(select(type(first)).where(type(first).id == first.id)).one()
        assert loaded.labels == ["体育", "财经"]


def test_dataset_name_and_version_are_unique(engine) -> None:
    from storage.models import Dataset

    with new_session(engine) as session:
        session.add(Dataset(version=1, **_dataset_fields("news")))
        session.add(Dataset(version=1, **_dataset_fields("news")))
        with pytest.raises(IntegrityError):
            session.commit()


def test_dataset_names_are_unique_per_channel_not_across_channels(engine) -> None:
    from storage.models import Dataset

    with new_session(engine) as session:
        session.add(Dataset(version=1, **_dataset_fields("news", "C1")))
        session.add(Dataset(version=1, **_dataset_fields("news", "C2")))
        session.add(Dataset(version=1, **_dataset_fields("news")))  # the deployment's own
        session.commit()
        session.add(Dataset(version=1, **_dataset_fields("news", "C1")))
        with pytest.raises(IntegrityError):
            session.commit()


def test_versions_count_per_channel_not_per_name(engine) -> None:
    with new_session(engine) as session:
        a1 = create_dataset(session, **_dataset_fields("news", "CA"))
        a2 = create_dataset(session, **_dataset_fields("news", "CA"))
        b1 = create_dataset(session, **_dataset_fields("news", "CB"))  # B's own v1, not A's v3
        deployment = create_dataset(session, **_dataset_fields("news"))
        session.commit()
        assert (a1.version, a2.version, b1.version, deployment.version) == (1, 2, 1, 1)


def test_a_name_resolves_to_the_channels_own_then_a_shared_one_then_the_deployments(
    engine,
) -> None:
    from storage.datasets import find_dataset, set_dataset_shared, visible_datasets

    with new_session(engine) as session:
        a1 = create_dataset(session, **_dataset_fields("news", "CA"))
        a2 = create_dataset(session, **_dataset_fields("news", "CA"))
        b1 = create_dataset(session, **_dataset_fields("news", "CB"))
        demo = create_dataset(session, **_dataset_fields("news-demo"))  # the deployment's
        session.commit()
        assert find_dataset(session, name="news", channel_id="CB").id == b1.id
        assert find_dataset(session, name="news", channel_id="CC") is None  # A's is private
        assert find_dataset(session, name="news-demo", channel_id="CC").id == demo.id
        assert find_dataset(session, name="news", channel_id="CA", version=1).id == a1.id
        assert [d.id for d in visible_datasets(session, channel_id="CC")] == [demo.id]

        assert set_dataset_shared(session, name="news", channel_id="CA", shared=True) == 2
        a3 = create_dataset(session, **_dataset_fields("news", "CA"))  # stays shared
        session.commit()
        assert a3.shared and a3.version == 3
        assert find_dataset(session, name="news", channel_id="CC").id == a3.id
        assert find_dataset(session, name="news", channel_id="CB").id == b1.id  # own first
        assert {d.id for d in visible_datasets(session, channel_id="CC")} == {
            a1.id,
            a2.id,
            a3.id,
            demo.id,
        }
        assert set_dataset_shared(session, name="news", channel_id="CA", shared=False) == 3
        assert find_dataset(session, name="news", channel_id="CC") is None
        # The operator's lookup (the CLI, the stack's demo check) prefers the deployment's.
        create_dataset(session, **_dataset_fields("news-demo", "CA"))
        session.commit()
        assert get_dataset(session, name="news-demo").id == demo.id
