"""The funding ledger of one activation: booking what is owed (consume) and giving back what can no
longer be owed (release), from the rules of entitlement.consumption and the activation's history.

Everything here runs inside the caller's write transaction, on an activation row the caller has
locked, and is computed from the ledger itself: booking is idempotent (settling twice books
nothing the second time) and the ledger balances at every commit, per funder, to the cent:
committed = consumed + released + reserved. Releases also lower the program counter's
`cents_committed`, which caps compare against; consumption does not (consumed money stays spent).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Protocol
from zoneinfo import ZoneInfo

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from entitlement import consumption, counters, eventlog, rules
from entitlement.clock import Clock
from entitlement.config import Settings
from entitlement.consumption import Terms, Transition
from entitlement.errors import FailedPrecondition
from entitlement.programs import ProgramCatalog
from entitlement.storage.db import Database, utc
from entitlement.storage.models import Activation, Event, LedgerEntry

LIVE = ("active", "suspended")
# The money an activation's ledger still holds reserved, summed over its entries in SQL (committed -
# consumed - released, module docstring): above 0 while some month may still be owed. The settlement
# job looks for ended activations with some (months awaiting a usage report); the privacy purge
# leaves those bound to their account.
RESERVED_CENTS = func.sum(case((LedgerEntry.kind == "commit", LedgerEntry.amount_cents),
                               else_=-LedgerEntry.amount_cents))
HISTORY_EVENTS = {"activation.suspended": "suspend", "activation.resumed": "resume", "activation.revoked": "end"}
SETTLEMENT_ACTOR = "system:settlement"
EXPIRY_REASON = "end date passed"  # an expiry's reason: its event's, and the activation's `state_reason`


class Deps(Protocol):
    """What ledger bookings and jobs need: the server's Context has it all, and so has the jobs CLI."""

    @property
    def settings(self) -> Settings: ...

    @property
    def db(self) -> Database: ...

    @property
    def catalog(self) -> ProgramCatalog: ...

    @property
    def clock(self) -> Clock: ...


@dataclass
class Balances:
    """One activation's ledger, per funder, and the months already consumed."""

    committed: dict[str, int] = field(default_factory=dict)
    consumed: dict[str, int] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)
    consumed_months: set[str] = field(default_factory=set)

    def closed(self) -> dict[str, int]:
        funders = set(self.consumed) | set(self.released)
        return {f: self.consumed.get(f, 0) + self.released.get(f, 0) for f in funders}


@dataclass
class Booking:
    """What one settlement booked, per funder."""

    consumed: dict[str, int] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)
    months_consumed: list[str] = field(default_factory=list)

    @property
    def consumed_cents(self) -> int:
        return sum(self.consumed.values())

    @property
    def released_cents(self) -> int:
        return sum(self.released.values())


def terms(a: Activation) -> Terms | None:
    return consumption.terms_of(rules.decision_from_dict(json.loads(a.decision_json)["decision"]))


def balances(s: Session, activation_id: str) -> Balances:
    b = Balances()
    rows = s.execute(select(LedgerEntry.kind, LedgerEntry.funder_id, LedgerEntry.month,
                            func.sum(LedgerEntry.amount_cents))
                     .where(LedgerEntry.activation_id == activation_id)
                     .group_by(LedgerEntry.kind, LedgerEntry.funder_id, LedgerEntry.month)).all()
    for kind, funder, month, cents in rows:
        target = {"commit": b.committed, "consume": b.consumed, "release": b.released}.get(kind)
        if target is None:
            continue
        target[funder] = target.get(funder, 0) + int(cents)
        if kind == "consume":
            b.consumed_months.add(month)
    return b


def history(s: Session, a: Activation, timezone: str) -> list[Transition]:
    """The activation's suspensions, resumptions and revocation, by civil day, in log order."""
    tz = ZoneInfo(timezone)
    rows = s.execute(select(Event.type, Event.time).where(
        Event.subject == f"activations/{a.id}", Event.type.in_(list(HISTORY_EVENTS))).order_by(Event.seq)).all()
    return [Transition(utc(t).astimezone(tz).date(), HISTORY_EVENTS[kind]) for kind, t in rows]


def is_live(a: Activation, today: dt.date) -> bool:
    return a.state in LIVE and today <= a.end_date


def _book(s: Session, deps: Deps, a: Activation, kind: str, month: str, amounts: dict[str, int]) -> None:
    """The entries of one closing. A consumed month gets an entry for every funder, 0 cents
    included (a share under a cent a month rounds to 0 in some months): the funding report counts a
    funder's person-months by its consume entries (audit.proto `person_months_consumed`), and
    missed that funder's months of 0 cents (found by a review). A release of 0 cents is not written."""
    for funder, cents in sorted(amounts.items()):
        if cents or kind == "consume":
            s.add(LedgerEntry(activation_id=a.id, program_id=a.program_id, funder_id=funder, kind=kind,
                              month=month, amount_cents=cents, created_at=deps.clock.now()))


def settle(s: Session, deps: Deps, a: Activation, today: dt.date, *, until: dt.date | None = None,
           ended_on: dt.date | None = None) -> Booking:
    """Bring the activation's ledger up to date as of `today`: consume the months owed (`access`
    programs), then release every month that can no longer be owed. `until` (at most today) only
    limits consumption to the months begun by then: later ones stay reserved, and what can be
    released is always judged as of today. `ended_on`: the day access ends for good when the
    caller is revoking it now (its event is not written yet)."""
    booking = Booking()
    t = terms(a)
    if t is None or t.price_cents == 0:
        return booking
    transitions = history(s, a, deps.settings.timezone)
    if ended_on is not None:
        transitions.append(Transition(ended_on, "end"))
    b = balances(s, a.id)
    assessment = consumption.assess(t, a.start_date, a.end_date, transitions, b.consumed_months, today,
                                    is_live(a, today))
    due = [m for m in assessment.to_consume if until is None or m.first <= until]
    open_months = assessment.open_months + len(assessment.to_consume) - len(due)
    closed = b.closed()
    months_closed = sum(closed.values()) // t.price_cents
    for month in due:
        months_closed += 1
        amounts = consumption.closing(t, b.committed, closed, months_closed)
        _book(s, deps, a, "consume", month.label, amounts)
        booking.months_consumed.append(month.label)
        for f, cents in amounts.items():
            closed[f] = closed.get(f, 0) + cents
            booking.consumed[f] = booking.consumed.get(f, 0) + cents
    target = t.months - open_months
    if target > months_closed:
        amounts = consumption.closing(t, b.committed, closed, target)
        _book(s, deps, a, "release", today.strftime("%Y-%m"), amounts)
        counters.release(s, a.program_id, sum(amounts.values()))
        booking.released = amounts
    booking.released = {f: booking.released.get(f, 0) for f in sorted(t.shares_bp)}
    return booking


def consume_month(s: Session, deps: Deps, a: Activation, label: str) -> dict[str, int]:
    """Consume one month reported used (`use` programs): the next closing slot. The caller has
    checked the month is open (accessible, within its report window, not consumed)."""
    t = terms(a)
    assert t is not None
    if t.price_cents == 0:
        return {}
    b = balances(s, a.id)
    closed = b.closed()
    months_closed = sum(closed.values()) // t.price_cents + 1
    if months_closed > t.months:  # unreachable while the checks above hold; never overspend
        raise FailedPrecondition(f"nothing is reserved any more for {label}", reason="REPORT_WINDOW_CLOSED",
                                 metadata={"month": label})
    amounts = consumption.closing(t, b.committed, closed, months_closed)
    _book(s, deps, a, "consume", label, amounts)
    return amounts


def expire(s: Session, deps: Deps, a: Activation, today: dt.date, *, actor: str = SETTLEMENT_ACTOR,
           reason: str = EXPIRY_REASON) -> Booking:
    """Record that a live activation's end date has passed: state `expired` with `reason` as its
    state reason (the reason of its last state change, activation.proto), the months owed
    consumed, the remainder released, one `activation.expired` event (the months consumed, the cents
    consumed and released per funder: audit.proto)."""
    previous = a.state
    a.state, a.state_reason, a.updated_at = "expired", reason, deps.clock.now()
    booking = settle(s, deps, a, today)
    eventlog.append(s, time=deps.clock.now(), type="activation.expired", actor=actor,
                    subject=f"activations/{a.id}", program_id=a.program_id, reason=reason,
                    payload={"from": previous, "to": "expired", "end_date": a.end_date.isoformat(),
                             "consumed_months": booking.months_consumed,
                             "consumed_cents": dict(sorted(booking.consumed.items())),
                             "released_cents": booking.released})
    return booking
