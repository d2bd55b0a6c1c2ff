"""registry_people without its foreign key to registry_snapshots (import speed)

The key was checked for every imported row: on PostgreSQL one trigger call per row, 6.5 s of the
14 s merge of 2 M staged rows (EXPLAIN ANALYZE), 11.6 s of server CPU against 4.6 s without it; on
SQLite a parent lookup per row, which cost no measurable CPU. Its ON DELETE CASCADE was never used:
no code deletes a snapshot, and the import and pruning delete people rows explicitly in the
transaction that changes their snapshot's status. The guarantee moves to the invariant checker
(entitlement/doctor.py: REGISTRY_ROW_ORPHANED, REGISTRY_ROWS_OF_DEAD_SNAPSHOT).

PostgreSQL drops the constraint. SQLite cannot drop a constraint: the table is rebuilt (still
WITHOUT ROWID, as 0003 made it) with CREATE / INSERT ... SELECT / DROP / RENAME, inside the
migration's transaction. The downgrade puts the key back; it fails (nothing changed) when rows
name a snapshot that does not exist, which the doctor reports first.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

CONSTRAINT = "registry_people_snapshot_id_fkey"  # PostgreSQL's default name, as 0001 created it
COLUMNS = "snapshot_id, person_key, birth_date, postal_code, registered_on, registration_ended_on, category"
FOREIGN_KEY = "FOREIGN KEY(snapshot_id) REFERENCES registry_snapshots (id) ON DELETE CASCADE"


def _rebuild_sqlite(with_foreign_key: bool) -> None:
    op.execute(
        "CREATE TABLE registry_people_new ("
        "snapshot_id INTEGER NOT NULL, "
        "person_key BLOB NOT NULL, birth_date DATE NOT NULL, postal_code VARCHAR(5) NOT NULL, "
        "registered_on DATE NOT NULL, registration_ended_on DATE, category SMALLINT NOT NULL, "
        "PRIMARY KEY (snapshot_id, person_key)"
        + (f", {FOREIGN_KEY}" if with_foreign_key else "")
        + ") WITHOUT ROWID")
    # In key order: the new table's B-tree is filled by appends.
    op.execute(f"INSERT INTO registry_people_new ({COLUMNS}) SELECT {COLUMNS} FROM registry_people "
               "ORDER BY snapshot_id, person_key")
    op.execute("DROP TABLE registry_people")
    op.execute("ALTER TABLE registry_people_new RENAME TO registry_people")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(with_foreign_key=False)
    else:
        op.drop_constraint(CONSTRAINT, "registry_people", type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(with_foreign_key=True)
    else:
        op.create_foreign_key(CONSTRAINT, "registry_people", "registry_snapshots", ["snapshot_id"], ["id"],
                              ondelete="CASCADE")
