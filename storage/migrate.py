"""Alembic, configured in code from a database URL (no alembic.ini to keep in sync)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def current(database_url: str) -> None:
    command.current(alembic_config(database_url), verbose=True)


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def check_schema(engine: Engine) -> None:
    """Raise ConfigError unless the database is at the newest migration."""
    from alembic.runtime.migration import MigrationContext

    from core.errors import ConfigError

    with engine.connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
    if revision != head_revision():
        state = "is not migrated" if revision is None else f"is at schema {revision}"
        raise ConfigError(
            f"the database {state}; run `python -m storage migrate` first "
            f"(newest schema: {head_revision()})"
        )
