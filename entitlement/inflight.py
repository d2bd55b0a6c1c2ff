"""AIP-155 requests in flight: a retry that arrives while the first attempt with the same
`request_id` is still being processed is answered ABORTED (reason `REQUEST_IN_FLIGHT`) at once,
instead of queueing behind it; the client retries later and gets the stored response replayed.

Two guards, both released by the end of the first attempt whatever its outcome (a crash included):
- in this process, a set of the (database, caller, request_id) being processed, checked before any
  database work (on SQLite, where the whole database has one writer, this is the only guard: a
  single server process writes to a SQLite file);
- on PostgreSQL, across server processes, a transaction-scoped advisory lock keyed by a 64-bit
  hash of (caller, request_id), taken first thing in the write transaction. It is released when
  that transaction commits or rolls back, or when its connection dies: no "pending" record can be
  left behind by a crash, and nothing needs to expire. (Two different requests whose keys collide,
  a 2^-64 chance, would see one answered ABORTED; retrying succeeds.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import BigInteger, bindparam, func, select
from sqlalchemy.orm import Session

from entitlement.errors import Aborted
from entitlement.storage import direct
from entitlement.storage.db import Database
from entitlement.storage.db import advisory_key as _advisory_key

_lock = threading.Lock()
_processing: set[tuple[str, str, str]] = set()


def in_flight(request_id: str) -> Aborted:
    return Aborted("a request with this request_id is still being processed; retry it later to get its "
                   "response", reason="REQUEST_IN_FLIGHT", metadata={"in_flight_request_id": request_id})


@contextmanager
def claim(db: Database, caller_id: str, request_id: str) -> Iterator[None]:
    """Hold (caller, request_id) for the duration of the block, in this process."""
    if not request_id:
        yield
        return
    key = (db.url, caller_id, request_id)
    with _lock:
        if key in _processing:
            raise in_flight(request_id)
        _processing.add(key)
    try:
        yield
    finally:
        with _lock:
            _processing.discard(key)


def is_processing(db: Database, caller_id: str, request_id: str) -> bool:
    """Is a request with this (caller, request_id) being processed in this process right now?"""
    with _lock:
        return (db.url, caller_id, request_id) in _processing


def advisory_key(caller_id: str, request_id: str) -> int:
    """The signed 64-bit PostgreSQL advisory lock key of a (caller, request_id)."""
    return _advisory_key("entitlement.request", caller_id, request_id)


# Built once (every write with a request id on PostgreSQL runs it), run on Core.
_TRY_LOCK = select(func.pg_try_advisory_xact_lock(bindparam("key", type_=BigInteger)))


def lock_read(s: Session, caller_id: str, request_id: str) -> tuple[Any, dict[str, Any]] | None:
    """The statement `lock` runs (for direct.Statements.prefetch), or None when it runs none."""
    if not request_id or s.get_bind().dialect.name != "postgresql":
        return None
    return _TRY_LOCK, {"key": advisory_key(caller_id, request_id)}


def lock(s: Session, caller_id: str, request_id: str) -> None:
    """PostgreSQL: take the request's advisory lock for this transaction, or answer ABORTED when
    another transaction (of any server process) holds it."""
    read = lock_read(s, caller_id, request_id)
    if read is not None and not direct.of(s).first(*read)[0]:
        raise in_flight(request_id)
