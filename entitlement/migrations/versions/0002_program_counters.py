"""program counters: seats and cents used per program, for caps

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "program_counters",
        sa.Column("program_id", sa.String(length=63), nullable=False),
        sa.Column("seats_used", sa.BigInteger(), nullable=False),
        sa.Column("cents_committed", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("program_id"),
    )
    # Backfill from what already happened: seats = activations made, cents = committed - released.
    op.execute(
        "INSERT INTO program_counters (program_id, seats_used, cents_committed) "
        "SELECT a.program_id, COUNT(*), "
        "COALESCE((SELECT SUM(CASE WHEN l.kind = 'commit' THEN l.amount_cents "
        "WHEN l.kind = 'release' THEN -l.amount_cents ELSE 0 END) "
        "FROM ledger_entries l WHERE l.program_id = a.program_id), 0) "
        "FROM activations a GROUP BY a.program_id"
    )


def downgrade() -> None:
    op.drop_table("program_counters")
