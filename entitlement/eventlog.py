"""The append-only event log: every state change is one event, written in the same transaction as
the change. Sequence numbers come from the single `log_head` row, incremented in that transaction,
so they have no gaps even when transactions roll back (the basis of the Merkle log of step 6)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from entitlement.storage.models import Event, LogHead


def canonical_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def append(session: Session, *, time: dt.datetime, type: str, actor: str, subject: str,
           reason: str = "", program_id: str | None = None, payload: dict[str, Any] | None = None) -> int:
    """Append one event; returns its sequence number. The caller's transaction commits it."""
    seq = session.execute(
        update(LogHead).where(LogHead.id == 1).values(size=LogHead.size + 1).returning(LogHead.size)
    ).scalar_one()
    session.add(Event(seq=seq, time=time, type=type, actor=actor, subject=subject, program_id=program_id,
                      reason=reason, payload_json=canonical_json(payload or {})))
    return int(seq)
