"""The append-only event log: every state change is one event, written in the same transaction as
the change. Sequence numbers come from the single `log_head` row, incremented in that transaction,
so they have no gaps even when transactions roll back. Each event is also a leaf of the log's
Merkle tree (entitlement/logtree.py), stored in the same transaction: its leaf hash is over the
encoding of entitlement/logformat.py."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from entitlement import logtree
from entitlement.storage import direct
from entitlement.logformat import LogEvent, time_us
from entitlement.storage.models import Activation, Event, LogHead, ReportRollup

ACTIVATION_PREFIX = "activations/"


# Built once: every write transaction takes its sequence number with it. A transaction that books
# ledger entries (an activation) also reads, in the same statement, the funding report's time zone,
# which the rollup (entitlement/rollup.py) needs when it flushes them: one statement less.
_NEXT_SEQ = update(LogHead).where(LogHead.id == 1).values(size=LogHead.size + 1).returning(LogHead.size)
_NEXT_SEQ_AND_TIMEZONE = update(LogHead).where(LogHead.id == 1).values(size=LogHead.size + 1).returning(
    LogHead.size, select(ReportRollup.timezone).where(ReportRollup.id == 1).scalar_subquery())

_INSERT_EVENT = insert(Event)
_HEAD_TAKEN = "eventlog_head_taken"  # session.info: a HeadTaken


@dataclass(frozen=True)
class HeadTaken:
    """What `append` learnt with its sequence number, valid for that transaction only."""

    transaction: Any  # the session's root transaction whose UPDATE holds the log_head row
    timezone_read: bool  # whether that statement read report_rollup's time zone
    rollup_timezone: str | None = None  # what it read (None: no row)


def head_taken(session: Session) -> HeadTaken | None:
    """Set when the session's current transaction has taken the log_head row (the UPDATE of
    `append`, whose row lock lasts until the transaction ends)."""
    taken: HeadTaken | None = session.info.get(_HEAD_TAKEN)
    return taken if taken is not None and taken.transaction is session.get_transaction() else None


def holds_log_head(session: Session) -> bool:
    return head_taken(session) is not None


def forget_head(session: Session) -> None:
    """Drop what `append` learnt (the report's time zone changes: entitlement.rollup.rebuild)."""
    session.info.pop(_HEAD_TAKEN, None)


def canonical_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def append(session: Session, *, time: dt.datetime, type: str, actor: str, subject: str,
           reason: str = "", program_id: str | None = None, payload: dict[str, Any] | None = None,
           platform_id: str | None = None, read_rollup_timezone: bool = False) -> int:
    """Append one event; returns its sequence number. The caller's transaction commits it.
    An event about an activation is tagged with the activation's platform (read from the
    session, where the caller has it already), for the platform's change stream.
    `read_rollup_timezone`: read the funding report's time zone with the sequence number, for the
    rollup of ledger entries this transaction flushes later (entitlement.rollup.stored_timezone)."""
    if platform_id is None and subject.startswith(ACTIVATION_PREFIX):
        activation = session.get(Activation, subject[len(ACTIVATION_PREFIX):])
        platform_id = activation.platform_id if activation is not None else None
    # Stored in UTC (SQLite keeps no offset), so the time read back is the time hashed.
    time = time.astimezone(dt.timezone.utc) if time.tzinfo else time.replace(tzinfo=dt.timezone.utc)
    payload_json = canonical_json(payload or {})
    st = direct.of(session)  # the transaction's DBAPI connection (entitlement/storage/direct.py)
    head = st.first(_NEXT_SEQ_AND_TIMEZONE if read_rollup_timezone else _NEXT_SEQ)
    if head is None:  # migration 0001 creates the row; nothing deletes it
        raise RuntimeError("the event log has no log_head row: the database was not migrated")
    seq_value, rollup_timezone = (head[0], head[1]) if read_rollup_timezone else (head[0], None)
    seq = int(seq_value)
    session.info[_HEAD_TAKEN] = HeadTaken(session.get_transaction(), read_rollup_timezone, rollup_timezone)
    # At once (not a pending ORM object flushed at commit: nothing reads it back through the
    # session, and the unit of work's pass per mapper cost more than the statement).
    st.execute(_INSERT_EVENT, {
        "seq": seq, "time": time, "type": type, "actor": actor, "subject": subject, "program_id": program_id,
        "reason": reason, "payload_json": payload_json, "platform_id": platform_id})
    leaf = LogEvent(seq, time_us(time), type, actor, subject, program_id or "", reason, payload_json)
    logtree.add_leaf(session, seq - 1, leaf.leaf_hash())
    return seq
