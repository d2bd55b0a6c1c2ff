"""Program counters: seats taken and cents committed (net of releases) per program.

`reserve` is the one place caps are enforced: a single conditional UPDATE in the activation's own
transaction. On PostgreSQL the row lock it takes makes concurrent activations queue on the
counter, and the WHERE clause re-reads the committed value, so no interleaving can overspend; on
SQLite writers are already serialized by BEGIN IMMEDIATE.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, Update, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from entitlement.programs import Program
from entitlement.storage import direct
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


def reserve(s: Session, program: Program, cents: int, day: dt.date) -> bool:
    """Take one seat and `cents`, within the caps in force on `day`, in one conditional UPDATE;
    False when a cap would be exceeded. A program's counter row is created on its first
    activation (when the UPDATE finds no row), so the usual activation costs one statement."""
    seats = program.optional_value("max_seats", day)
    budget = program.optional_value("max_budget_cents", day)
    params = {"program": program.id, "cents": cents,
              "max_seats": seats.value if seats is not None else None,
              "max_cents": budget.value if budget is not None else None}
    stmt = _RESERVE[(seats is not None, budget is not None)]
    st = direct.of(s)
    if st.changed(stmt, params) == 1:
        return True
    st.end(failed=False)  # the ORM below (a program's first activation, or a cap): out of pipeline mode
    if s.get(ProgramCounter, program.id) is None:
        _ensure_row(s, program.id)
    # Again, whether we created the row or found it: on PostgreSQL a concurrent first activation of
    # the program may have committed the row between the UPDATE above (no row then) and the read
    # (READ COMMITTED). Only this UPDATE's answer says whether a cap refused.
    return st.changed(stmt, params) == 1


def release(s: Session, program_id: str, cents: int) -> None:
    """Give back committed cents (revocation, expiry). Seats stay taken: a seat was used."""
    if cents:
        s.connection().execute(update(ProgramCounter).where(ProgramCounter.program_id == program_id)
                  .values(cents_committed=ProgramCounter.cents_committed - cents))
