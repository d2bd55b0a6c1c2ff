"""The invariant checker: what must hold in the database whatever happened (crashes, concurrent
writers, outages). `entitlement doctor` runs it from the command line; the tests run the same
function after their scenarios.

Each check reads in bulk (aggregates or one streaming pass), so it also runs on a large database.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from entitlement import rollup
from entitlement.logformat import LogEvent, time_us
from entitlement.storage.db import Database, utc
from entitlement.storage.models import (Activation, Event, IdempotencyRecord, LedgerEntry, LogHead, LogNode,
                                        ProgramCounter)


@dataclass(frozen=True)
class Problem:
    code: str  # stable, UPPER_SNAKE
    detail: str  # names rows by id or sequence number, never a person


def check(db: Database, *, leaves: bool = True) -> list[Problem]:
    """Every invariant; an empty list means the database is sound. `leaves=False` skips recomputing
    each event's leaf hash (the one check that reads every event's payload)."""
    problems: list[Problem] = []
    with db.read() as s:
        problems += _event_log(s, leaves)
        problems += _activations_have_their_records(s)
        problems += _ledger_balances(s)
        problems += _counters(s)
        problems += _idempotency(s)
        problems += _report_rollup(s)
    return problems


def _event_log(s: Session, leaves: bool) -> list[Problem]:
    out = []
    count, top = s.execute(select(func.count(), func.coalesce(func.max(Event.seq), 0)).select_from(Event)).one()
    head = s.execute(select(LogHead.size).where(LogHead.id == 1)).scalar_one_or_none() or 0
    if not count == top == head:
        out.append(Problem("EVENT_SEQUENCE_GAP", f"{count} events, highest seq {top}, log head {head}"))
    stored = s.execute(select(func.count()).select_from(LogNode).where(LogNode.level == 0)).scalar_one()
    if stored != count:
        out.append(Problem("LOG_LEAVES_MISSING", f"{count} events but {stored} leaf hashes"))
    if leaves:
        hashes = dict(s.execute(select(LogNode.idx, LogNode.hash).where(LogNode.level == 0)).all())
        for e in s.execute(select(Event).order_by(Event.seq)).scalars():
            leaf = LogEvent(e.seq, time_us(utc(e.time)), e.type, e.actor, e.subject, e.program_id or "", e.reason,
                            e.payload_json).leaf_hash()
            if hashes.get(e.seq - 1) != leaf:
                out.append(Problem("EVENT_ALTERED", f"event seq {e.seq} does not match its logged leaf hash"))
                break  # the first one is what matters; the verifier names it too
    return out


def _activations_have_their_records(s: Session) -> list[Problem]:
    out = []
    created = select(Event.subject).where(Event.type == "activation.created")
    missing_event = s.execute(select(Activation.id).where(
        ("activations/" + Activation.id).not_in(created)).limit(5)).scalars().all()
    for aid in missing_event:
        out.append(Problem("ACTIVATION_WITHOUT_EVENT", f"activations/{aid} has no activation.created event"))
    orphans = s.execute(select(LedgerEntry.id).where(
        LedgerEntry.activation_id.not_in(select(Activation.id))).limit(5)).scalars().all()
    for entry in orphans:
        out.append(Problem("LEDGER_WITHOUT_ACTIVATION", f"ledger entry {entry} has no activation"))
    return out


def _ledger_balances(s: Session) -> list[Problem]:
    """Per activation: commits add up to its funding plan; per funder, consumed + released never
    exceed committed (what is left is still reserved)."""
    out: list[Problem] = []
    sums: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
    for aid, funder, kind, cents in s.execute(
            select(LedgerEntry.activation_id, LedgerEntry.funder_id, LedgerEntry.kind,
                   func.sum(LedgerEntry.amount_cents))
            .group_by(LedgerEntry.activation_id, LedgerEntry.funder_id, LedgerEntry.kind)):
        sums[aid][(funder, kind)] = int(cents)
    for aid, decision_json in s.execute(select(Activation.id, Activation.decision_json)):
        plan = json.loads(decision_json)["decision"]["funding_plan"]
        ledger = sums.get(aid, {})
        committed = {f: c for (f, k), c in ledger.items() if k == "commit"}
        expected = {f: int(c) for f, _bp, c in plan["shares"]} if plan else {}
        if committed != expected:
            out.append(Problem("COMMIT_MISMATCH", f"activations/{aid}: committed {committed}, plan {expected}"))
            continue
        for funder, total in committed.items():
            spent = ledger.get((funder, "consume"), 0) + ledger.get((funder, "release"), 0)
            if spent > total:
                out.append(Problem("LEDGER_OVERSPENT",
                                   f"activations/{aid}, {funder}: consumed + released {spent} > committed {total}"))
    return out


def _counters(s: Session) -> list[Problem]:
    """Program counters (what caps compare against) agree with the ledger and the activations."""
    out = []
    signed = case((LedgerEntry.kind == "commit", LedgerEntry.amount_cents),
                  (LedgerEntry.kind == "release", -LedgerEntry.amount_cents), else_=0)
    net = dict(s.execute(select(LedgerEntry.program_id, func.sum(signed)).group_by(LedgerEntry.program_id)).all())
    seats = dict(s.execute(select(Activation.program_id, func.count()).group_by(Activation.program_id)).all())
    counters = {r.program_id: r for r in s.execute(select(ProgramCounter)).scalars()}
    for program in sorted(set(seats) | set(counters)):
        c = counters.get(program)
        want_seats, want_cents = int(seats.get(program, 0)), int(net.get(program, 0) or 0)
        if c is None or (c.seats_used, c.cents_committed) != (want_seats, want_cents):
            got = "no counter" if c is None else f"{c.seats_used} seats, {c.cents_committed} cents"
            out.append(Problem("COUNTER_MISMATCH", f"programs/{program}: counter {got}; activations and "
                               f"ledger say {want_seats} seats, {want_cents} cents"))
    return out


def _idempotency(s: Session) -> list[Problem]:
    """An acknowledged request's stored answer points at a row that exists."""
    out = []
    known = set(s.execute(select(Activation.id)).scalars())
    for method, response in s.execute(select(IdempotencyRecord.method, IdempotencyRecord.response)):
        try:
            target = json.loads(response).get("activation_id")
        except (ValueError, AttributeError):
            continue
        if target and target not in known:
            out.append(Problem("ACKNOWLEDGED_BUT_MISSING", f"a stored {method} answer names activations/{target}"))
    return out


def _report_rollup(s: Session) -> list[Problem]:
    """The funding report's rollup (entitlement/rollup.py) equals its recomputation from the ledger
    entries and the activations."""
    return [Problem("REPORT_ROLLUP_MISMATCH", detail) for detail in list(rollup.differences(s))[:5]]
