"""Callers managed in the database: create, rotate, revoke, list (`entitlement callers ...`).

One row of `caller_credentials` per bearer token; the token itself is shown once, to the operator
who made it, and only its SHA-256 is stored (entitlement/callers.py says why not bcrypt). Every
change is an event of the event log, in the same transaction (`caller.created`, `caller.rotated`,
`caller.revoked`; actor: the operator; subject `callers/ID`; the payload has the role, the scope,
the credential ids and the expiry, never a token nor its hash).

Rotation: a new token for the same caller (same role and scope); the previous token keeps working
for the overlap (default ENTITLEMENT_CALLER_ROTATION_OVERLAP_MINUTES = 60), then is expired.
Revocation: every token of the caller stops at once in the table; running servers notice within
their cache time (ENTITLEMENT_CALLER_CACHE_SECONDS).

Concurrent commands on one caller id (two operators at once) run one after the other: each takes
the id's lock first thing in its transaction (`_lock`). On PostgreSQL (READ COMMITTED) the row
locks of `_rows` were not enough: a create found no row to lock, so two creates of one id both
succeeded (one id, two callers of different roles), and a revocation waiting on a rotation's row
locks then saw only the rows that existed when its statement began, leaving the rotation's new
token usable. The lock is a transaction-scoped advisory lock keyed by the id; the statements after
it see every command on the id committed before. SQLite: BEGIN IMMEDIATE serializes writers already.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from entitlement import eventlog
from entitlement.callers import Caller, CallerDirectory, credential_of, make_caller, new_token, token_hash
from entitlement.storage.db import Database, advisory_key, hold_until_commit, utc
from entitlement.storage.models import CallerCredential


class CallerError(Exception):
    """An operator mistake (unknown caller, duplicate id, ...): the message says what to do."""


@dataclass(frozen=True)
class Issued:
    caller: Caller
    credential_id: str
    token: str  # shown once
    expires_at: dt.datetime | None


@dataclass(frozen=True)
class CallerRow:
    """One caller as `callers list` shows it: its newest credential and how many are usable."""

    caller: Caller
    state: str  # active | expired | revoked | misconfigured (Credential.problem)
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    usable_tokens: int  # 2 during a rotation's overlap


def _scope(c: Caller) -> dict[str, str]:
    return {k: v for k, v in (("platform", c.platform_id), ("advisor", c.advisor_id),
                              ("agency", c.agency_code), ("funder", c.funder_id)) if v}


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else utc(t).isoformat()


def _lock(s: Session, caller_id: str) -> None:
    """Hold `caller_id` until the transaction ends (module docstring): the first statement of every
    command that reads a caller's rows and then writes, before `_rows`."""
    hold_until_commit(s, advisory_key("entitlement.caller", caller_id))


def _rows(s: Session, caller_id: str) -> list[CallerCredential]:
    return list(s.execute(select(CallerCredential).where(CallerCredential.caller_id == caller_id)
                          .order_by(CallerCredential.created_at.desc(), CallerCredential.id)
                          .with_for_update()).scalars())


def _usable(rows: list[CallerCredential], now: dt.datetime) -> list[CallerCredential]:
    return [r for r in rows if not credential_of(r).problem(now)]


def _add(s: Session, caller: Caller, now: dt.datetime, expires_at: dt.datetime | None,
         rotated_from: str | None) -> tuple[CallerCredential, str]:
    token = new_token()
    row = CallerCredential(id=uuid.uuid4().hex, caller_id=caller.id, role=caller.role,
                           platform_id=caller.platform_id, advisor_id=caller.advisor_id,
                           agency_code=caller.agency_code, funder_id=caller.funder_id,
                           token_sha256=token_hash(token), created_at=now, expires_at=expires_at,
                           revoked_at=None, rotated_from=rotated_from)
    s.add(row)
    return row, token


def create(db: Database, caller: Caller, *, now: dt.datetime, actor: str,
           expires_in: dt.timedelta | None = None, file: CallerDirectory | None = None) -> Issued:
    """A new caller with its first token. Refused when the id is in use (in the table, even
    revoked: ids appear in events and idempotency records, so they are never reused; or in the
    credentials file `file`)."""
    if file is not None and file.get(caller.id) is not None:
        raise CallerError(f"caller {caller.id} is in the credentials file (ENTITLEMENT_CALLERS_FILE); "
                          "pick another id")
    expires_at = now + expires_in if expires_in is not None else None
    with db.write() as s:
        _lock(s, caller.id)
        if _rows(s, caller.id):
            raise CallerError(f"caller {caller.id} exists already (ids are never reused; "
                              f"`entitlement callers rotate {caller.id}` gives it a new token)")
        row, token = _add(s, caller, now, expires_at, None)
        s.flush()
        eventlog.append(s, time=now, type="caller.created", actor=actor, subject=f"callers/{caller.id}",
                        payload={"role": caller.role, "scope": _scope(caller), "credential": row.id,
                                 "expires_at": _iso(expires_at)})
    return Issued(caller, row.id, token, expires_at)


def rotate(db: Database, caller_id: str, *, now: dt.datetime, actor: str, overlap: dt.timedelta,
           expires_in: dt.timedelta | None = None) -> Issued:
    """A new token for `caller_id`; its usable tokens keep working for `overlap`, then expire.
    The new token lives `expires_in` (default: as long as the current one was given, or without
    expiry when it had none)."""
    if overlap < dt.timedelta(0):
        raise CallerError("the overlap cannot be negative")
    with db.write() as s:
        _lock(s, caller_id)
        rows = _rows(s, caller_id)
        if not rows:
            raise CallerError(f"no caller {caller_id} in the database (`entitlement callers list`)")
        usable = _usable(rows, now)
        if not usable:
            raise CallerError(f"caller {caller_id} has no usable token (revoked or expired): "
                              "create a new caller instead")
        current = usable[0]
        caller = credential_of(current).caller
        if expires_in is None and current.expires_at is not None:
            expires_in = utc(current.expires_at) - utc(current.created_at)
        expires_at = now + expires_in if expires_in is not None else None
        old_until = now + overlap
        for r in usable:
            if r.expires_at is None or utc(r.expires_at) > old_until:
                r.expires_at = old_until
        row, token = _add(s, caller, now, expires_at, current.id)
        s.flush()
        eventlog.append(s, time=now, type="caller.rotated", actor=actor, subject=f"callers/{caller_id}",
                        payload={"role": caller.role, "scope": _scope(caller), "credential": row.id,
                                 "rotated_from": current.id, "previous_valid_until": _iso(old_until),
                                 "expires_at": _iso(expires_at)})
    return Issued(caller, row.id, token, expires_at)


def revoke(db: Database, caller_id: str, *, now: dt.datetime, actor: str, reason: str = "") -> int:
    """Revoke every token of `caller_id` now; returns how many were still usable."""
    with db.write() as s:
        _lock(s, caller_id)
        rows = _rows(s, caller_id)
        if not rows:
            raise CallerError(f"no caller {caller_id} in the database (callers of the credentials file are "
                              "removed from the file, then the server restarted)")
        live = [r for r in rows if r.revoked_at is None]
        if not live:
            raise CallerError(f"caller {caller_id} is revoked already")
        usable = len(_usable(rows, now))
        for r in live:
            r.revoked_at = now
        caller = credential_of(rows[0]).caller
        eventlog.append(s, time=now, type="caller.revoked", actor=actor, subject=f"callers/{caller_id}",
                        reason=reason, payload={"role": caller.role, "scope": _scope(caller),
                                                "credentials": sorted(r.id for r in live)})
    return usable


def list_callers(db: Database, now: dt.datetime) -> list[CallerRow]:
    with db.read() as s:
        rows = list(s.execute(select(CallerCredential).order_by(
            CallerCredential.caller_id, CallerCredential.created_at.desc(), CallerCredential.id)).scalars())
    by_caller: dict[str, list[CallerCredential]] = {}
    for r in rows:
        by_caller.setdefault(r.caller_id, []).append(r)
    out = []
    for caller_id, creds in by_caller.items():
        newest = creds[0]
        cred = credential_of(newest)
        usable = _usable(creds, now)
        state = ("active" if usable else "revoked" if newest.revoked_at is not None
                 else "misconfigured" if cred.problem(now) == "MISCONFIGURED" else "expired")
        out.append(CallerRow(cred.caller, state, utc(newest.created_at), cred.expires_at, cred.revoked_at,
                             len(usable)))
    return out


__all__ = ["CallerError", "CallerRow", "Issued", "create", "list_callers", "make_caller", "revoke", "rotate"]
