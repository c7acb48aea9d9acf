"""per-claim lease tokens, delivery errors, thread errors, channel-scoped dataset names

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCOPE = sa.text("coalesce(channel_id, '')")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lease_token", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.add_column(
            sa.Column("thread_error", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=True)
        )
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("delivery_error", sa.Text(), nullable=True))
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("shared", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.drop_constraint("uq_datasets_name_version", type_="unique")
    # Existing rows keep their versions: they were unique per name, so per (channel, name) too.
    op.create_index(
        "uq_datasets_scope_name_version", "datasets", [SCOPE, "name", "version"], unique=True
    )


def downgrade() -> None:
    op.drop_index("uq_datasets_scope_name_version", table_name="datasets")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_datasets_name_version", ["name", "version"])
        batch_op.drop_column("shared")
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.drop_column("delivery_error")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("thread_error")
        batch_op.drop_column("lease_token")
