"""Indexes of the funding report at a million activations (bench/activations.py)

- ix_ledger_kind_funder_month: the report's activation counts start from the `commit` entries of
  a funder and program booked up to a month, then need only their activation ids: equality on
  (kind, funder_id, program_id), a range on month, activation_id in the index (index-only).
- ix_ledger_month_cover: the report's money of a month range, for one funder or for all (an
  admin's report has no funder to seek on): every column it reads, so the scan never touches the
  table.
- ix_activations_span: what the counts read of each activation (start and end dates, state,
  last update), by id, without reading the row itself (whose decision_json is large; on SQLite
  the columns after it sit on overflow pages).

Revision ID: 0008
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_ledger_kind_funder_month", "ledger_entries",
                    ["kind", "funder_id", "program_id", "month", "activation_id"])
    op.create_index("ix_ledger_month_cover", "ledger_entries",
                    ["month", "funder_id", "program_id", "kind", "activation_id", "amount_cents"])
    op.create_index("ix_activations_span", "activations", ["id", "start_date", "end_date", "state", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_activations_span", table_name="activations")
    op.drop_index("ix_ledger_month_cover", table_name="ledger_entries")
    op.drop_index("ix_ledger_kind_funder_month", table_name="ledger_entries")
