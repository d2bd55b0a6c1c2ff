"""registry_people WITHOUT ROWID on SQLite (bulk import speed); nothing to do on PostgreSQL

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = "snapshot_id, person_key, birth_date, postal_code, registered_on, registration_ended_on, category"


def _rebuild(without_rowid: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute(
        "CREATE TABLE registry_people_new ("
        "snapshot_id INTEGER NOT NULL, "
        "person_key BLOB NOT NULL, birth_date DATE NOT NULL, postal_code VARCHAR(5) NOT NULL, "
        "registered_on DATE NOT NULL, registration_ended_on DATE, category SMALLINT NOT NULL, "
        "PRIMARY KEY (snapshot_id, person_key), "
        "FOREIGN KEY(snapshot_id) REFERENCES registry_snapshots (id) ON DELETE CASCADE)"
        + (" WITHOUT ROWID" if without_rowid else ""))
    op.execute(f"INSERT INTO registry_people_new ({COLUMNS}) SELECT {COLUMNS} FROM registry_people")
    op.execute("DROP TABLE registry_people")
    op.execute("ALTER TABLE registry_people_new RENAME TO registry_people")


def upgrade() -> None:
    _rebuild(without_rowid=True)


def downgrade() -> None:
    _rebuild(without_rowid=False)
