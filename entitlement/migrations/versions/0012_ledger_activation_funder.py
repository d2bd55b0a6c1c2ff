"""ix_ledger_activation (activation_id) -> (activation_id, funder_id, kind), same name

A funder sees an activation only when it has a share of that activation's funding: a `commit`
entry of the activation for the funder (entitlement/audit.py `funds`, an EXISTS in ListActivations,
ListEvents and StreamEvents). Each candidate row costs one probe of this index by (activation id,
funder, kind), answered from the index alone, with no ledger row read. The index replaces the one
on activation_id alone rather than joining it: every reader of that one (an activation's balances,
its foreign key) seeks on its leading column as before, and each ledger entry written still costs
two index entries, not three.

Both directions read every entry to rebuild the index, with writes to the ledger blocked meanwhile
(run by `entitlement db upgrade`, the server stopped).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_ledger_activation", table_name="ledger_entries")
    op.create_index("ix_ledger_activation", "ledger_entries", ["activation_id", "funder_id", "kind"])


def downgrade() -> None:
    op.drop_index("ix_ledger_activation", table_name="ledger_entries")
    op.create_index("ix_ledger_activation", "ledger_entries", ["activation_id"])
