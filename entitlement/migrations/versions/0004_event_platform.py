"""events.platform_id (the change stream filters by platform) and an index on an activation's history

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

APPEND_ONLY_MESSAGE = "is append-only: UPDATE and DELETE are refused"

# Events about an activation carry its platform. The column is derived from the activations
# table, not part of what the event says: filling it for existing events is the one UPDATE the
# append-only log ever gets, inside this migration's transaction with the guard lifted and put back.
BACKFILL = (
    "UPDATE events SET platform_id = (SELECT a.platform_id FROM activations a "
    "WHERE events.subject = 'activations/' || a.id) WHERE events.subject LIKE 'activations/%'"
)


def upgrade() -> None:
    op.add_column("events", sa.Column("platform_id", sa.String(length=63), nullable=True))
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER events_no_update")
        op.execute(BACKFILL)
        op.execute("CREATE TRIGGER events_no_update BEFORE UPDATE ON events "
                   f"BEGIN SELECT RAISE(ABORT, 'events {APPEND_ONLY_MESSAGE}'); END")
    else:
        op.execute("ALTER TABLE events DISABLE TRIGGER events_append_only")
        op.execute(BACKFILL)
        op.execute("ALTER TABLE events ENABLE TRIGGER events_append_only")
    op.create_index("ix_events_platform_seq", "events", ["platform_id", "seq"], unique=False)
    op.create_index("ix_events_subject_seq", "events", ["subject", "seq"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_events_subject_seq", table_name="events")
    op.drop_index("ix_events_platform_seq", table_name="events")
    # Native DROP COLUMN on both backends (SQLite >= 3.35): a batch rebuild of the table would
    # lose its append-only triggers.
    op.execute("ALTER TABLE events DROP COLUMN platform_id")
