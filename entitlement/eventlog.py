"""The append-only event log: every state change is one event, written in the same transaction as
the change. Sequence numbers come from the single `log_head` row, incremented in that transaction,
so they have no gaps even when transactions roll back. Each event is also a leaf of the log's
Merkle tree (entitlement/logtree.py), stored in the same transaction: its leaf hash is over the
encoding of entitlement/logformat.py."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from entitlement import logtree
from entitlement.logformat import LogEvent, time_us
from entitlement.storage.models import Activation, Event, LogHead

ACTIVATION_PREFIX = "activations/"


# Built once: every write transaction takes its sequence number with it.
_NEXT_SEQ = update(LogHead).where(LogHead.id == 1).values(size=LogHead.size + 1).returning(LogHead.size)


def canonical_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def append(session: Session, *, time: dt.datetime, type: str, actor: str, subject: str,
           reason: str = "", program_id: str | None = None, payload: dict[str, Any] | None = None,
           platform_id: str | None = None) -> int:
    """Append one event; returns its sequence number. The caller's transaction commits it.
    An event about an activation is tagged with the activation's platform (read from the
    session, where the caller has it already), for the platform's change stream."""
    if platform_id is None and subject.startswith(ACTIVATION_PREFIX):
        activation = session.get(Activation, subject[len(ACTIVATION_PREFIX):])
        platform_id = activation.platform_id if activation is not None else None
    # Stored in UTC (SQLite keeps no offset), so the time read back is the time hashed.
    time = time.astimezone(dt.timezone.utc) if time.tzinfo else time.replace(tzinfo=dt.timezone.utc)
    payload_json = canonical_json(payload or {})
    seq = int(session.connection().execute(_NEXT_SEQ).scalar_one())
    session.add(Event(seq=seq, time=time, type=type, actor=actor, subject=subject, program_id=program_id,
                      reason=reason, payload_json=payload_json, platform_id=platform_id))
    leaf = LogEvent(seq, time_us(time), type, actor, subject, program_id or "", reason, payload_json)
    logtree.add_leaf(session, seq - 1, leaf.leaf_hash())
    return seq
