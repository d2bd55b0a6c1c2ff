"""The ledger's report indexes, three into one: drop the two nothing reads since the rollup (0010),
and give the third the amount, so that the rollup's rebuild reads its money from it alone

- ix_ledger_month_cover (month, funder_id, program_id, kind, activation_id, amount_cents): made by
  0008 for GetFundingReport's money of a month range. Since 0010 the report reads its rollup
  tables; the one statement left that read it is the rollup's rebuild of its money columns
  (entitlement/rollup.py `_money`: a GROUP BY over every entry, run by `entitlement db
  rebuild-report` and `entitlement doctor`).
- ix_ledger_funder_program_month (funder_id, program_id, month), from 0001: every reader with a
  funder also filters on `kind`.
- ix_ledger_kind_funder_month (kind, funder_id, program_id, month, activation_id), from 0008: the
  `commit` entries of a funder and program up to a month (the rollup's rebuild of its activity,
  the report's path in another time zone). Replaced by ix_ledger_kind_funder_month_cents, the same
  columns and amount_cents: it serves those readers as before, and `_money` (grouped in its order)
  reads it alone, in order, without sorting the entries.

Measured before the change: PostgreSQL's own counters (pg_stat_user_indexes.idx_scan) over the
836 PostgreSQL tests that run in process, 0 scans of ix_ledger_month_cover and 2 of
ix_ledger_funder_program_month, against 343 for ix_ledger_kind_funder_month and 646 for
ix_ledger_activation. Every index costs each ledger entry written (an activation writes one per
funder, the monthly settlement one per funder and month, a revocation its releases) an index entry,
and the disk. With bench.activations at 200,000 activations (1,793,216 entries), before and
after: the ledger's indexes 570 -> 278 MB on SQLite and 636 -> 359 MB on PostgreSQL, the whole
database 1,708 -> 1,416 MB and 1,336 -> 1,058 MB; the rebuild's money 1.0 s on SQLite either way
(6.0 s with the two dropped and no amount in the third: the entries sorted), 5.6-6.2 s -> 0.8 s on
PostgreSQL. docs/PERFORMANCE-LOG.md (twenty-first session) has the rest.

Both directions read every entry to build an index (the downgrade builds three), with writes
to the ledger blocked meanwhile (run by `entitlement db upgrade`, the server stopped). Measured on
1,793,216 entries (bench.activations' fill at 200,000 activations): up 15.3 and 12.2 s on SQLite,
12.1 and 14.6 s on PostgreSQL; down 21.7 s (SQLite) and 29.0 s (PostgreSQL).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_ledger_kind_funder_month_cents", "ledger_entries",
                    ["kind", "funder_id", "program_id", "month", "activation_id", "amount_cents"])
    op.drop_index("ix_ledger_kind_funder_month", table_name="ledger_entries")
    op.drop_index("ix_ledger_month_cover", table_name="ledger_entries")
    op.drop_index("ix_ledger_funder_program_month", table_name="ledger_entries")


def downgrade() -> None:
    op.create_index("ix_ledger_funder_program_month", "ledger_entries", ["funder_id", "program_id", "month"])
    op.create_index("ix_ledger_kind_funder_month", "ledger_entries",
                    ["kind", "funder_id", "program_id", "month", "activation_id"])
    op.create_index("ix_ledger_month_cover", "ledger_entries",
                    ["month", "funder_id", "program_id", "kind", "activation_id", "amount_cents"])
    op.drop_index("ix_ledger_kind_funder_month_cents", table_name="ledger_entries")
