"""Jobs run by the operator (cron, `entitlement jobs ...`), not by callers.

Settlement (`entitlement jobs run [--until DATE]`): for every live activation, book what is owed
up to the date (entitlement.consumption: for `access` programs, each month of access begun during
which access was on), and record the expiry of those whose end date has passed (state `expired`,
one `activation.expired` event, the remainder released). Ended activations of `use` programs whose
months may still be reported keep them reserved: the job releases each when its report window
closes. Idempotent: running it twice books nothing the second time. Each activation it books
something for gets one event: `ledger.consumed` (or `ledger.released` when it only released).

Revalidation (`entitlement jobs revalidate`): re-checks live activations against the current
registry snapshot with the terms they were granted (`rules.revalidate`: the criteria and parameter
values recorded with the activation's decision, whatever the program file says now, or if it is
gone), when that snapshot is newer than the data the activation was decided on. Holders who
stopped being eligible get their end date moved to what the program gives (or expire at once when
that is already past), with one `activation.curtailed` event each and the months no longer
reachable released.

Each activation is handled in its own short write transaction, on its locked row, so the jobs run
safely beside the server (and beside each other). Every state change is one event, with actor
`system:settlement` or `system:revalidation` and a reason. On SQLite the jobs also pause now and
then (`_Turns`): short as they are, their transactions followed one another so closely that the
server's writes never got SQLite's lock in between.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from entitlement import eventlog, ledger, registry, rules
from entitlement.ledger import LIVE, Booking, Deps
from entitlement.storage.db import SQLITE_TURN_PAUSE_S
from entitlement.storage.models import Activation, LedgerEntry, RegistryPerson, RegistrySnapshot

REVALIDATION_ACTOR = "system:revalidation"

# SQLite: a job holds the write lock for at most about HOLD_S (one activation's transaction after
# another), then lets it go for PAUSE_S (`_Turns`).
HOLD_S = 0.5
PAUSE_S = SQLITE_TURN_PAUSE_S


class _Turns:
    """SQLite: pauses between a job's transactions, so that other processes' writers get the lock.
    Each activation's transaction is short (about 1 ms), but the next one began some 0.1 ms after
    its COMMIT, and a writer of another process (the server's: its activations, redemptions,
    suspensions) waits for a locked file in SQLite's busy handler, which sleeps up to 100 ms
    between two tries: it nearly always woke to find the lock taken again. Measured (200,000
    activations, bench.activations' fill, a settlement over 3,000 of them: 2,690 transactions, the
    longest 5 ms): a writer beside it waited 2.3 s, the whole run; a run over a million activations
    would fail every such write UNAVAILABLE past its 5 s lock timeout. So, after about HOLD_S of
    transactions, the job sleeps PAUSE_S (more than the busy handler's longest sleep: every waiter
    tries during it, and a server's writers queued behind it follow at once). The same run after:
    the writer's longest wait 0.53 s, the run 4.1 s instead of 2.5 s. PostgreSQL: nothing (a
    writer waits on a row lock, queued in turn, never polling)."""

    def __init__(self, deps: Deps) -> None:
        self.sqlite = deps.db.is_sqlite
        self.since = time.monotonic()

    def next(self) -> None:
        """Called before each transaction: a pause once the lock was held long enough."""
        if self.sqlite and time.monotonic() - self.since >= HOLD_S:
            time.sleep(PAUSE_S)
            self.since = time.monotonic()


@dataclass
class SettlementSummary:
    as_of: dt.date
    examined: int = 0
    expired: int = 0
    months_consumed: int = 0
    consumed_cents: int = 0
    released_cents: int = 0

    def add(self, booking: Booking) -> None:
        self.months_consumed += len(booking.months_consumed)
        self.consumed_cents += booking.consumed_cents
        self.released_cents += booking.released_cents


@dataclass
class RevalidationSummary:
    as_of: dt.date
    snapshot_id: int | None = None
    examined: int = 0
    up_to_date: int = 0  # decided on data at least as recent as the snapshot: nothing to re-check
    still_eligible: int = 0
    # No longer eligible, but access already ends by the date the program gives (curtailed by an
    # earlier run, or planned to end sooner): nothing to change. Not "still eligible".
    already_ending: int = 0
    curtailed: int = 0
    expired: int = 0
    released_cents: int = 0
    skipped: int = 0  # their snapshot's rows went during the run (a later import pruned them): next run


def _rows_kept(s: Session, snapshot_id: int) -> bool:
    """Whether the snapshot still holds its rows (complete, not superseded or purged)."""
    status = s.execute(select(RegistrySnapshot.status).where(RegistrySnapshot.id == snapshot_id)).scalar_one_or_none()
    return status == "complete"


def _lock(s: Session, activation_id: str) -> Activation | None:
    return s.execute(select(Activation).where(Activation.id == activation_id).with_for_update()).scalar_one_or_none()


def _settlement_candidates(deps: Deps, only: Iterable[str] | None) -> list[str]:
    """Live activations, and ended ones with money still reserved (months awaiting a usage report)."""
    live = select(Activation.id).where(Activation.state.in_(LIVE))
    reserved = (select(LedgerEntry.activation_id).join(Activation, Activation.id == LedgerEntry.activation_id)
                .where(Activation.state.not_in(LIVE)).group_by(LedgerEntry.activation_id)
                .having(ledger.RESERVED_CENTS > 0))
    if only is not None:
        ids = list(only)
        live = live.where(Activation.id.in_(ids))
        reserved = reserved.where(LedgerEntry.activation_id.in_(ids))
    with deps.db.read() as s:
        found = set(s.execute(live).scalars()) | set(s.execute(reserved).scalars())
    return sorted(found)


def run_settlement(deps: Deps, until: dt.date | None = None, *,
                   activation_ids: Iterable[str] | None = None) -> SettlementSummary:
    """Book consumption and expiry up to `until` (default today; never in the future).
    `activation_ids` limits the run to those activations (tests, repairs)."""
    today = deps.clock.today()
    if until is not None and until > today:
        raise ValueError(f"cannot settle up to {until.isoformat()}: it is in the future (today is {today.isoformat()})")
    summary = SettlementSummary(until or today)
    turns = _Turns(deps)
    for activation_id in _settlement_candidates(deps, activation_ids):
        turns.next()
        with deps.db.write() as s:
            a = _lock(s, activation_id)
            if a is None:
                continue
            # The day, once the row is held: a run that goes on past midnight settles each activation
            # as of the day the server changes it on (as of the day the run began, a month of a `use`
            # program that a revocation of the new day kept reportable was released).
            today = deps.clock.today()
            as_of = until or today
            summary.examined += 1
            if a.state in LIVE and a.end_date < as_of:
                summary.add(ledger.expire(s, deps, a, today))
                summary.expired += 1
            else:
                booking = ledger.settle(s, deps, a, today, until=as_of)
                summary.add(booking)
                _log_booking(s, deps, a, booking, as_of)
    return summary


def _log_booking(s: Session, deps: Deps, a: Activation, booking: Booking, as_of: dt.date) -> None:
    """One event for what one settlement booked on one activation (nothing booked: no event):
    `ledger.consumed` (months consumed, perhaps with releases), or `ledger.released` when it only
    released months whose use can no longer be reported. Cents per funder; no personal data."""
    if not booking.months_consumed and not booking.released_cents:
        return
    kind = "ledger.consumed" if booking.months_consumed else "ledger.released"
    eventlog.append(s, time=deps.clock.now(), type=kind, actor=ledger.SETTLEMENT_ACTOR,
                    subject=f"activations/{a.id}", program_id=a.program_id,
                    reason=f"settlement up to {as_of.isoformat()}",
                    payload={"as_of": as_of.isoformat(), "consumed_months": booking.months_consumed,
                             "consumed_cents": dict(sorted(booking.consumed.items())),
                             "released_cents": dict(sorted(booking.released.items()))})


def _facts(s: Session, snapshot_id: int, person_key: bytes) -> rules.PersonFacts | None:
    row = s.execute(select(RegistryPerson).where(
        and_(RegistryPerson.snapshot_id == snapshot_id, RegistryPerson.person_key == person_key))).scalar_one_or_none()
    if row is None:
        return None
    return rules.PersonFacts(row.birth_date, row.postal_code, row.registered_on, row.registration_ended_on,
                             row.category)


def run_revalidation(deps: Deps, *, activation_ids: Iterable[str] | None = None) -> RevalidationSummary:
    """Re-check live activations against the current registry snapshot; end those whose holders
    stopped being eligible. `activation_ids` limits the run to those activations."""
    today = deps.clock.today()
    summary = RevalidationSummary(today)
    with deps.db.read() as s:
        snapshot = registry.current_snapshot(s)
        q = select(Activation.id).where(Activation.state.in_(LIVE), Activation.end_date >= today)
        if activation_ids is not None:
            q = q.where(Activation.id.in_(list(activation_ids)))
        ids = sorted(s.execute(q).scalars())
    if snapshot is None:
        return summary
    summary.snapshot_id = snapshot.id
    turns = _Turns(deps)
    for activation_id in ids:
        turns.next()
        with deps.db.write() as s:
            a = _lock(s, activation_id)
            # The day, once the row is held (as settlement does): a run that goes on past midnight
            # judged every activation as of the day it began, and logged one curtailed to that day
            # `to: active` when its access had already ended.
            today = deps.clock.today()
            if a is None or not ledger.is_live(a, today):
                continue
            # The snapshot in force now, in this activation's transaction: imports may switch (and
            # prune the rows of older snapshots) while a long run goes on.
            snapshot = registry.current_snapshot(s) or snapshot
            summary.examined += 1
            program = deps.catalog.get(a.program_id)
            stored = json.loads(a.decision_json)
            decision = rules.decision_from_dict(stored["decision"])
            decided_on = decision.circumstances.registry_extracted_on
            decided_snapshot = (stored.get("registry_snapshot") or {}).get("id")
            # Decided on this very snapshot, or (facts from the live source) on data as new as its
            # own: nothing to re-check. A corrected extract of the same day is another snapshot, so
            # it is re-checked. (Data dated after today is a wrong date, which must not exempt an
            # activation from every later extract.)
            if decided_snapshot == snapshot.id or (
                    decided_snapshot is None and decided_on is not None
                    and snapshot.extracted_on <= decided_on <= today):
                summary.up_to_date += 1
                continue
            facts = _facts(s, snapshot.id, a.person_key)
            if facts is None and not _rows_kept(s, snapshot.id):
                # Its rows went meanwhile (pruned by two later imports, or purged): an absence that
                # says nothing about the person. Left for the next run.
                summary.skipped += 1
                continue
            # Judged by the terms granted (the criteria and values recorded with the decision), not
            # by the file as edited since, nor skipped when the file is gone (rules.granted).
            verdict = rules.revalidate(rules.granted(program, decision), facts, a.start_date, today,
                                       snapshot.extracted_on)
            if verdict.eligible or verdict.access_end is None:
                summary.still_eligible += 1
                continue
            if verdict.access_end >= a.end_date:
                summary.already_ending += 1
                continue
            # Not the day the person's registration ended (`verdict.stopped_on`): the registry's
            # data about a person, which the append-only log would keep past any purge; the
            # criteria failed and the new end date say what funders need.
            reason = (f"no longer eligible ({', '.join(verdict.failed_reasons)}) in registry snapshot "
                      f"{snapshot.id} of {snapshot.extracted_on.isoformat()}")
            previous_state, previous_end = a.state, a.end_date
            a.end_date, a.updated_at = verdict.access_end, deps.clock.now()
            if a.end_date < today:
                # A state change: its reason is the activation's state reason (activation.proto).
                a.state, a.state_reason = "expired", reason
                summary.expired += 1
            else:
                summary.curtailed += 1
            booking = ledger.settle(s, deps, a, today)
            summary.released_cents += booking.released_cents
            eventlog.append(
                s, time=deps.clock.now(), type="activation.curtailed", actor=REVALIDATION_ACTOR,
                subject=f"activations/{a.id}", program_id=a.program_id, reason=reason,
                payload={"from": previous_state, "to": a.state, "previous_end_date": previous_end.isoformat(),
                         "end_date": a.end_date.isoformat(), "failed_criteria": list(verdict.failed_reasons),
                         "registry_snapshot": snapshot.id, "consumed_months": booking.months_consumed,
                         "consumed_cents": dict(sorted(booking.consumed.items())),
                         "released_cents": booking.released})
    return summary
