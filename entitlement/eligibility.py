"""Use case: check a job seeker's eligibility (advisors), list programs."""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from entitlement import counters, facts as person_facts, rules
from entitlement.app import Context
from entitlement.callers import Caller
from entitlement.errors import InvalidArgument, NotFound
from entitlement.paging import PageTokens, page_size
from entitlement.programs import Program
from entitlement.registry import SnapshotRef


class JobSeeker(NamedTuple):  # named tuples: one of each per check (cheaper than frozen dataclasses)
    agency_id: str
    birth_date: dt.date


class CheckResult(NamedTuple):
    decisions: tuple[rules.Decision, ...]
    snapshot: SnapshotRef | None
    # The date of facts not read from a snapshot (the live source's answer: today), as the answer
    # reports it; the decisions' circumstances hold the date the freshness rule judged, which for
    # a past day (as_of) is that day.
    facts_on: dt.date | None = None


def resolve_program(ctx: Context, program_id: str, field: str = "program") -> Program:
    program = ctx.catalog.get(program_id)
    if program is None:
        raise NotFound(f"program programs/{program_id} not found", reason="PROGRAM_NOT_FOUND",
                       metadata={"program": f"programs/{program_id}"})
    return program


def check(ctx: Context, who: JobSeeker, program_id: str | None, as_of: dt.date | None,
          mentor_id: str = "") -> CheckResult:
    today = ctx.clock.today()
    day = as_of or today
    if day > today:
        raise InvalidArgument.single("as_of", "must not be in the future")
    programs = [resolve_program(ctx, program_id)] if program_id else ctx.catalog.all()
    key = ctx.pseudo.person_key(who.agency_id)
    live = person_facts.ask_live(ctx, who.agency_id, who.birth_date)
    # Two independent statements (the second only for capped programs), no transaction: the
    # counters are as last committed either way (an activation takes its seat under the cap's own
    # conditional update, not from this read). Hot reads: straight on the DBAPI (storage/hotread.py).
    facts, snapshot, source = person_facts.lookup(ctx.db.hot, key, who.birth_date, live)
    usage = counters.usage(ctx.db.hot, programs)
    extracted = facts_on = person_facts.data_date(snapshot, source, today)
    if extracted is not None and day < extracted <= today:
        # A past day (as_of) judged on data extracted since: as fresh as data can be for that day.
        # (Data dated after today is a wrong date: the rule refuses it.)
        extracted = day
    decisions = tuple(rules.evaluate(p, facts, day, rules.Circumstances(
        registry_extracted_on=extracted, seats_used=usage[p.id][0], cents_committed=usage[p.id][1],
        mentor_id=mentor_id, facts_source=source)) for p in programs)
    return CheckResult(decisions, snapshot, facts_on if snapshot is None else None)


def list_programs(ctx: Context, caller: Caller, size: int, token: str,
                  as_of: dt.date | None) -> tuple[list[Program], str, dt.date]:
    """A page of programs and their parameters on `as_of` (default: today), the next page's token,
    and the day the page shows. A token is bound to the request's `as_of` as given, and carries the
    day its first page showed: the pages of one listing show one day, even across midnight (a token
    bound to the day resolved from an empty `as_of` was refused after midnight)."""
    size = page_size(size, default=50, maximum=200)
    tokens = PageTokens(ctx.pseudo.derive("page-token"))
    filters = {"as_of": as_of.isoformat() if as_of else "", "caller": caller.id}
    position = tokens.read(token, "programs", filters)
    after = str(position[0]) if position else ""
    day = as_of or (dt.date.fromisoformat(str(position[1])) if position and len(position) > 1
                    else ctx.clock.today())
    programs = [p for p in ctx.catalog.all() if p.id > after]
    page = programs[:size]
    next_token = tokens.issue("programs", filters, [page[-1].id, day.isoformat()]) if len(programs) > size else ""
    return page, next_token, day
