"""Program counters: seats taken and cents committed (net of releases) per program.

`reservation` is the one place caps are enforced: a single conditional UPDATE in the activation's
own transaction. On PostgreSQL the row lock it takes makes concurrent activations queue on the
counter, and the WHERE clause re-reads the committed value, so no interleaving can overspend; on
SQLite writers are already serialized by BEGIN IMMEDIATE.
"""

from __future__ import annotations

import datetime as dt
import weakref

from sqlalchemy import Connection, Update, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from entitlement.programs import Program
from entitlement.storage import direct
from entitlement.storage.db import Database
from entitlement.storage.hotread import HotReads
from entitlement.storage.models import ProgramCounter


CAP_CRITERIA = frozenset({"seats_available", "budget_available"})
_USAGE = select(ProgramCounter.program_id, ProgramCounter.seats_used, ProgramCounter.cents_committed).where(
    ProgramCounter.program_id.in_(bindparam("ids", expanding=True)))
_ALL_USAGE = select(ProgramCounter.program_id, ProgramCounter.seats_used, ProgramCounter.cents_committed)


def usage(conn: Connection | HotReads | direct.Statements, programs: list[Program]) -> dict[str, tuple[int, int]]:
    """(seats used, cents committed) per program, as last committed, in one query, read only for
    programs with a cap criterion (the others get (0, 0): their rules never look at it, and
    checks, the hot path, skip a round trip)."""
    capped = [p.id for p in programs if not CAP_CRITERIA.isdisjoint(p.criteria)]
    found: dict[str, tuple[int, int]] = {}
    if capped and not isinstance(conn, Connection):  # HotReads, direct.Statements: no IN list to expand,
        # one row per program: all of them
        found = {r[0]: (int(r[1]), int(r[2])) for r in conn.all(_ALL_USAGE) if r[0] in capped}
    elif capped:
        rows = conn.execute(_USAGE, {"ids": capped}).all()
        found = {r[0]: (int(r[1]), int(r[2])) for r in rows}
    return {p.id: found.get(p.id, (0, 0)) for p in programs}


def _ensure_row(s: Session, program_id: str) -> None:
    dialect = s.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    s.connection().execute(insert(ProgramCounter).values(program_id=program_id, seats_used=0, cents_committed=0)
                           .on_conflict_do_nothing(index_elements=["program_id"]))


def _reserve_statement(seats_cap: bool, budget_cap: bool) -> Update:
    stmt = update(ProgramCounter).where(ProgramCounter.program_id == bindparam("program")).values(
        seats_used=ProgramCounter.seats_used + 1, cents_committed=ProgramCounter.cents_committed + bindparam("cents"))
    if seats_cap:
        stmt = stmt.where(ProgramCounter.seats_used + 1 <= bindparam("max_seats"))
    if budget_cap:
        stmt = stmt.where(ProgramCounter.cents_committed + bindparam("cents") <= bindparam("max_cents"))
    return stmt


# Built once, one per combination of caps (the write path runs one of them per activation).
_RESERVE = {(seats, budget): _reserve_statement(seats, budget) for seats in (False, True) for budget in (False, True)}


class CounterRowMissing(Exception):
    """The program's counter row, made by `ensure_row` before the transaction, is gone (nothing in
    the service deletes one): the caller makes it again and retries the activation."""


# Programs whose counter row each Database is known to hold (rows are made once and never deleted).
_KNOWN: weakref.WeakKeyDictionary[Database, set[str]] = weakref.WeakKeyDictionary()


def ensure_row(db: Database, program_id: str, missing: bool = False) -> None:
    """Make the program's counter row if it does not exist yet, in a transaction of its own (once
    per program and Database, which a server process builds once: then remembered; `missing`: a
    transaction found it gone, look again). The activation's conditional UPDATE then always finds the row, so an UPDATE that
    changes nothing means a cap refused."""
    known = _KNOWN.get(db)  # (per activation: no new set made when there is one)
    if known is None:
        known = _KNOWN.setdefault(db, set())
    if missing:
        known.discard(program_id)
    if program_id in known:
        return
    with db.write(idempotent=True) as s:  # (on the event loop: the activation's own write may still be deferred)
        _ensure_row(s, program_id)
    known.add(program_id)


class Reservation:
    """One seat and `cents`, taken within the caps in force, in one conditional UPDATE, in two
    steps: the UPDATE is sent when made (on PostgreSQL, in the write path's pipeline, it is queued
    and travels with the next statement whose rows are read: the event log's sequence number), and
    `taken` reads its answer. The counter row is locked from the UPDATE to the commit, so sent
    late it is held only while its writer waits for the event log's head and holds it: activations
    of one program no longer queue on it through their earlier round trips. Needs the row to exist (`ensure_row`, before the transaction): nothing else
    in the transaction may wait on a counter row once it holds the log head (a writer holding the
    counter and waiting for the head would deadlock with it)."""

    __slots__ = ("_s", "_program_id", "_count")

    def __init__(self, s: Session, stmt: Update, params: dict[str, object]) -> None:
        self._s, self._program_id = s, str(params["program"])
        self._count = direct.of(s).changed_later(stmt, params)

    def taken(self) -> bool:
        if self._count.value() == 1:
            return True
        s = self._s
        direct.of(s).end(failed=False)  # the ORM read below: out of pipeline mode
        if s.get(ProgramCounter, self._program_id) is None:  # a plain read: no lock, no wait
            raise CounterRowMissing(self._program_id)
        return False  # the row is there: a cap refused


def reservation(s: Session, program: Program, cents: int, day: dt.date) -> Reservation:
    """Send the conditional UPDATE that takes one seat and `cents` within the caps in force on
    `day` (the one place caps are enforced); `taken()` on the answer says whether it took."""
    seats = program.optional_value("max_seats", day)
    budget = program.optional_value("max_budget_cents", day)
    params: dict[str, object] = {"program": program.id, "cents": cents,
                                 "max_seats": seats.value if seats is not None else None,
                                 "max_cents": budget.value if budget is not None else None}
    return Reservation(s, _RESERVE[(seats is not None, budget is not None)], params)


def release(s: Session, program_id: str, cents: int) -> None:
    """Give back committed cents (revocation, expiry). Seats stay taken: a seat was used."""
    if cents:
        s.connection().execute(update(ProgramCounter).where(ProgramCounter.program_id == program_id)
                  .values(cents_committed=ProgramCounter.cents_committed - cents))
