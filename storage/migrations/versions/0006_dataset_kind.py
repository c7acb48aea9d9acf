"""datasets.kind: training data (sft) or a multiple-choice benchmark (the forgetting check)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 21:20:00

A plain ADD COLUMN, not a batch: SQLite's batch mode copies the table and cannot carry the
expression index ``uq_datasets_scope_name_version`` over (SQLAlchemy does not reflect it), so a
batch would drop the uniqueness of (scope, name, version) silently. The downgrade needs a batch on
SQLite and puts the index back after it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCOPE = sa.text("coalesce(channel_id, '')")


def upgrade() -> None:
    op.add_column(
        "datasets",
        sa.Column(
            "kind",
            sqlmodel.sql.sqltypes.AutoString(length=20),
            nullable=False,
            server_default="sft",
        ),
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("datasets", schema=None) as batch_op:
            batch_op.drop_column("kind")
        op.create_index(
            "uq_datasets_scope_name_version", "datasets", [SCOPE, "name", "version"], unique=True
        )
    else:
        op.drop_column("datasets", "kind")
