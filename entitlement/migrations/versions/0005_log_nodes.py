"""log_nodes: the event log's Merkle tree (leaf hashes and complete subtree hashes), append-only

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

APPEND_ONLY_MESSAGE = "is append-only: UPDATE and DELETE are refused"
BATCH = 5000

# The leaf encoding of an event, version 1, frozen here as it was when this migration was written
# (entitlement/logformat.py is the reference; tests/test_audit_log.py checks both agree).
_TAG = b"entitlement/event/v1"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _str(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _leaf_hash(seq: int, time: dt.datetime, type_: str, actor: str, subject: str, program_id: str | None,
               reason: str, payload_json: str) -> bytes:
    if time.tzinfo is None:
        time = time.replace(tzinfo=dt.timezone.utc)
    micros = (time - _EPOCH) // dt.timedelta(microseconds=1)
    data = b"".join([_str(_TAG), struct.pack(">Qq", seq, micros),
                     *(_str(s.encode("utf-8")) for s in (type_, actor, subject, program_id or "", reason,
                                                        payload_json))])
    return hashlib.sha256(b"\x00" + data).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def upgrade() -> None:
    log_nodes = op.create_table(
        "log_nodes",
        sa.Column("level", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx"),
    )
    _backfill(log_nodes)
    _append_only("log_nodes")


def _backfill(log_nodes: sa.Table) -> None:
    """The tree of the events already logged: every leaf, every complete subtree."""
    bind = op.get_bind()
    events = sa.table("events", sa.column("seq", sa.BigInteger()), sa.column("time", sa.DateTime(timezone=True)),
                      sa.column("type", sa.String()), sa.column("actor", sa.String()),
                      sa.column("subject", sa.String()), sa.column("program_id", sa.String()),
                      sa.column("reason", sa.Text()), sa.column("payload_json", sa.Text()))
    size = bind.execute(sa.text("SELECT size FROM log_head WHERE id = 1")).scalar_one()
    frontier: list[tuple[int, bytes]] = []  # (level, hash) of the complete subtrees so far
    rows: list[dict[str, object]] = []
    expected = 1
    last = 0
    while True:
        batch = bind.execute(sa.select(events).where(events.c.seq > last).order_by(events.c.seq).limit(BATCH)).all()
        if not batch:
            break
        for e in batch:
            if e.seq != expected:
                raise RuntimeError(f"the event log has no event {expected} (found {e.seq}): it cannot be hashed "
                                   f"into a Merkle tree; restore it before migrating")
            index = e.seq - 1
            level, h = 0, _leaf_hash(e.seq, e.time, e.type, e.actor, e.subject, e.program_id, e.reason,
                                     e.payload_json)
            rows.append({"level": 0, "idx": index, "hash": h})
            while frontier and frontier[-1][0] == level:
                h = _node_hash(frontier.pop()[1], h)
                level += 1
                rows.append({"level": level, "idx": index >> level, "hash": h})
            frontier.append((level, h))
            expected += 1
        last = batch[-1].seq
        if len(rows) >= BATCH:
            bind.execute(sa.insert(log_nodes), rows)
            rows = []
    if rows:
        bind.execute(sa.insert(log_nodes), rows)
    if expected - 1 != size:
        raise RuntimeError(f"log_head says {size} events, the events table holds {expected - 1}: restore the "
                           f"event log before migrating")


def _append_only(table: str) -> None:
    """As for events and ledger_entries (0001): the database refuses UPDATE and DELETE."""
    if op.get_bind().dialect.name == "sqlite":
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} {APPEND_ONLY_MESSAGE}'); END"
            )
    else:
        op.execute(
            f"CREATE FUNCTION {table}_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN RAISE EXCEPTION '{table} {APPEND_ONLY_MESSAGE}'; END $$"
        )
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {table}_append_only()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS log_nodes_no_update")
        op.execute("DROP TRIGGER IF EXISTS log_nodes_no_delete")
    else:
        op.execute("DROP TRIGGER IF EXISTS log_nodes_append_only ON log_nodes")
        op.execute("DROP TRIGGER IF EXISTS log_nodes_no_truncate ON log_nodes")
        op.execute("DROP FUNCTION IF EXISTS log_nodes_append_only()")
    op.drop_table("log_nodes")
