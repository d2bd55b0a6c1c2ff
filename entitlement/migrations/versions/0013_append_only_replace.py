"""SQLite: INSERT OR REPLACE refused on the append-only tables, as UPDATE and DELETE are

The append-only tables (events, ledger_entries, log_nodes) refuse UPDATE and DELETE by BEFORE
UPDATE / BEFORE DELETE triggers (0001, 0005). On SQLite, `INSERT OR REPLACE` (or `REPLACE`) of a
row whose key exists deletes the old row without firing delete triggers (SQLite fires them on a
REPLACE only under `PRAGMA recursive_triggers`), so it rewrote a logged event, a ledger entry or a
Merkle node without an error (found by a review). A BEFORE INSERT trigger fires before the
conflict is resolved: it refuses an insert whose key is taken, whatever the connection's pragmas.
Each insert into these tables then probes its primary key once more (a few microseconds).
PostgreSQL has no REPLACE; its `INSERT ... ON CONFLICT DO UPDATE` fires the UPDATE trigger.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

MESSAGE = "is append-only: a row is never replaced"
KEYS = {"events": ("seq",), "ledger_entries": ("id",), "log_nodes": ("level", "idx")}


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, key in KEYS.items():
        match = " AND ".join(f"{c} = NEW.{c}" for c in key)
        op.execute(f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "
                   f"WHEN EXISTS (SELECT 1 FROM {table} WHERE {match}) "
                   f"BEGIN SELECT RAISE(ABORT, '{table} {MESSAGE}'); END")


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in KEYS:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_replace")
