"""Use cases of funders and admins: list activations, the funding report, the event log.
A funder's scope (the activations it has a share of, and their events) is applied inside each query."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from sqlalchemy import Date, Integer, and_, bindparam, case, func, or_, select, tuple_
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement, Select

from entitlement import rollup, rules
from entitlement.activation import LIVE, effective_reason
from entitlement.app import Context
from entitlement.callers import Caller
from entitlement.errors import InvalidArgument, PermissionDenied
from entitlement.eventlog import ACTIVATION_PREFIX
from entitlement.paging import PageTokens, page_size
from entitlement.registry import SnapshotRef
from entitlement.storage.db import utc
from entitlement.storage.models import Activation, Event, LedgerEntry, LogNode, ReportMonth

# A month of this century (ASCII digits): what the reports, the ledger and ReportUsage name months by.
MONTH_RE = re.compile(r"^20[0-9]{2}-(0[1-9]|1[0-2])$")


@dataclass(frozen=True)
class ActivationFilter:
    program_id: str = ""
    funder: str = ""
    agency_code: str = ""
    state: str = ""
    created_from: dt.datetime | None = None
    created_to: dt.datetime | None = None


@dataclass(frozen=True)
class ReportRow:
    funder: str
    program_id: str
    month: str
    activations_started: int
    committed_cents: int
    consumed_cents: int
    released_cents: int
    activations_live: int = 0
    activations_ended: int = 0
    person_months_consumed: int = 0


@dataclass(frozen=True)
class EventView:
    seq: int
    time: dt.datetime
    type: str
    actor: str
    subject: str
    reason: str
    payload_json: str
    program_id: str = ""  # "" for an event about no program
    leaf_hash: bytes = b""  # its leaf in the Merkle log (entitlement/logtree.py)


def _tokens(ctx: Context) -> PageTokens:
    return PageTokens(ctx.pseudo.derive("page-token"))


def funds(activation_id: Any, funder: Any) -> ColumnElement[bool]:
    """The funder has a share of this activation's funding: a `commit` ledger entry of the
    activation booked for it (one per funder of the plan decided at activation, zero cents
    included).

    The ledger, not the program's dated `funders`: the plan was decided from the values in force on
    the activation's start date and booked then; it is what the funder pays by and what
    GetFundingReport reads, whatever the program file says later. (Comparing the start date with
    the intervals during which the funder has a share would need one range per interval OR'ed in
    every statement, and would follow any later edit of a past value.) The cost is one probe of
    ix_ledger_activation (activation_id, funder_id, kind) per candidate row, answered from the index
    alone, after the cheap filter on the programs the funder has a share of on some date."""
    return (select(LedgerEntry.activation_id)
            .where(LedgerEntry.activation_id == activation_id, LedgerEntry.funder_id == funder,
                   LedgerEntry.kind == "commit")
            .exists())


# The programs a funder's activations belong to, by the ledger: the funding report's rollup keeps a
# row per funder x program x month of every ledger entry (primary key funder first: an index seek).
_FUNDED_BY_LEDGER = select(ReportMonth.program_id).where(ReportMonth.funder_id == bindparam("funder")).distinct()


def funded_programs(ctx: Context, funder: str) -> list[str]:
    """Ids of the programs whose activations the funder may audit, a superset (the queries narrow
    to its activations: `funds`): those its program file gives it a share of on some date, and
    those the ledger has booked it for. The ledger's keep a program whose file was removed (or
    renamed, or whose past funders were rewritten) auditable by those who fund its activations:
    by the files alone, its funders saw none of them (an empty list, PERMISSION_DENIED with the
    program filter, an empty report and log)."""
    booked = {str(r[0]) for r in ctx.db.hot.all(_FUNDED_BY_LEDGER, {"funder": funder})}
    return sorted(set(ctx.catalog.funded_by(funder)) | booked)


def readable_event(e: Any, funder: Any, programs: list[str]) -> ColumnElement[bool]:
    """The event is about an activation the funder has a share of (`funds`). Every event with a
    program is about an activation (subject `activations/{id}`): there are no program-level events.
    `programs`: those the funder may audit (`funded_programs`), a cheap first filter."""
    return and_(e.program_id.in_(programs), e.subject.startswith(ACTIVATION_PREFIX),
                funds(func.substr(e.subject, len(ACTIVATION_PREFIX) + 1), funder))


def _scope(ctx: Context, caller: Caller, funder: str, program_id: str) -> tuple[str, list[str] | None]:
    """The funder whose share decides what the query may touch ("" for none: an admin without a
    funder filter; a funder caller is always its own, another funder's id is refused), and the
    program ids it may touch (None: no restriction). With a funder, `funded_programs`: a superset
    of the programs of the activations it funds, which the queries narrow to those (`funds`)."""
    if caller.role == "funder":
        if funder and funder != caller.funder_id:
            raise PermissionDenied("a funder can only audit what it funds", reason="OUT_OF_SCOPE")
        funder = caller.funder_id or ""
    if not funder:
        return "", ([program_id] if program_id else None)
    funded = funded_programs(ctx, funder)
    if program_id:
        if program_id not in funded and caller.role == "funder":
            raise PermissionDenied(f"programs/{program_id} is not funded by {funder}", reason="OUT_OF_SCOPE")
        # An admin may read everything: a funder and a program it has no share of are two filters
        # that match nothing (found by a review: the admin was PERMISSION_DENIED OUT_OF_SCOPE).
        return funder, [program_id]
    return funder, funded


class ListedActivation(NamedTuple):
    """An activation as ListActivations shows it: ActivationView's fields, read as plain columns
    (no ORM instance; a page of 100 is a hot read). `decision` is the stored decision less the
    circumstances no listing shows (the caps' counters and the mentor: zero and empty here), one
    object shared by every row whose stored decision differs only in those, with its `snapshot`."""

    id: str
    program_id: str
    state: str  # effective: a live activation past its end date is expired
    person_ref: str
    advisor_id: str
    agency_code: str
    start_date: dt.date
    end_date: dt.date
    created_at: dt.datetime  # the three instants are UTC, naive when the database returns them so (SQLite)
    updated_at: dt.datetime
    platform_id: str
    account_id: str | None
    redeemed_at: dt.datetime | None
    decision: rules.Decision
    snapshot: SnapshotRef | None
    state_reason: str


# What a listed page reads of an activation (not program_version, snapshot_id nor token_jti).
_LISTED_COLUMNS = (Activation.id, Activation.program_id, Activation.state, Activation.person_key,
                   Activation.advisor_id, Activation.agency_code, Activation.start_date, Activation.end_date,
                   Activation.created_at, Activation.updated_at, Activation.platform_id, Activation.account_id,
                   Activation.redeemed_at, Activation.decision_json, Activation.state_reason)
_LISTED_QUERIES: dict[tuple[Any, ...], Select[Any]] = {}


def _listed_query(shape: tuple[bool, bool, bool, str, bool, bool, bool]) -> Select[Any]:
    """The statement of one combination of filters (which are set, not their values: those are
    bound parameters), built once: building a select costs more than running it on a small page."""
    q = _LISTED_QUERIES.get(shape)
    if q is not None:
        return q
    scoped, funder, agency, state, created_from, created_to, position = shape
    q = select(*_LISTED_COLUMNS)
    if scoped:
        q = q.where(Activation.program_id.in_(bindparam("programs", expanding=True)))
    if funder:
        # One statement still: the rows come in index order as before, each probed once (`funds`).
        q = q.where(funds(Activation.id, bindparam("funder", type_=LedgerEntry.funder_id.type)))
    if agency:
        q = q.where(Activation.agency_code == bindparam("agency_code"))
    if state == "expired":
        q = q.where(or_(Activation.state == "expired",
                        and_(Activation.state.in_(LIVE), Activation.end_date < bindparam("today", type_=Date))))
    elif state in LIVE:
        q = q.where(Activation.state == bindparam("state"), Activation.end_date >= bindparam("today", type_=Date))
    elif state:
        q = q.where(Activation.state == bindparam("state"))
    if created_from:
        q = q.where(Activation.created_at >= bindparam("created_from", type_=Activation.created_at.type))
    if created_to:
        q = q.where(Activation.created_at < bindparam("created_to", type_=Activation.created_at.type))
    if position:
        # A row-value comparison: both backends seek the (created_at, id) index to the position, so
        # a page costs the same at any depth (an OR of the two conditions made PostgreSQL filter
        # every newer row again).
        q = q.where(tuple_(Activation.created_at, Activation.id) <
                    tuple_(bindparam("after_time", type_=Activation.created_at.type),
                           bindparam("after_id", type_=Activation.id.type)))
    q = q.order_by(Activation.created_at.desc(), Activation.id.desc()).limit(bindparam("limit", type_=Integer))
    _LISTED_QUERIES[shape] = q
    return q


_LISTED_DECISIONS: dict[object, tuple[rules.Decision, SnapshotRef | None]] = {}
_LISTED_DECISIONS_MAX = 1024
# A decision's circumstances as activation.py stores them (json.dumps, sorted keys), the two the
# Activation message shows captured as they are written.
_CIRCUMSTANCES_AT = '"circumstances": {'
_CIRCUMSTANCES = re.compile(r'"circumstances": \{"cents_committed": -?\d+, "facts_source": ("[a-z_]*"), '
                            r'"mentor_id": "[A-Za-z0-9._-]*", "registry_extracted_on": ("\d{4}-\d\d-\d\d"|null), '
                            r'"seats_used": -?\d+\}')


def _listed_decision(stored_json: str) -> tuple[rules.Decision, SnapshotRef | None]:
    """The decision and snapshot of a stored decision as a listing shows them, decoded once per
    distinct content: the rows of a page mostly share their program, day and rules' answer, and
    differ in the circumstances no listing shows (the caps' counters, which every activation
    counts up, and the mentor). Of the circumstances only the two the Activation message shows
    (the facts' source and the registry's extraction date) are kept, in the key and the decision.

    The key is the stored text less its `circumstances` object, where it was, and those two
    values: two texts with one key differ only in the three left out. The object is found only
    where it is one (a quote inside a JSON string is escaped); a decision stored in another shape
    is keyed by its whole text."""
    key: object = stored_json
    at = stored_json.find(_CIRCUMSTANCES_AT)
    m = _CIRCUMSTANCES.match(stored_json, at) if at >= 0 else None
    if m is not None:
        key = (at, stored_json[:at] + stored_json[m.end():], m[1], m[2])
    hit = _LISTED_DECISIONS.get(key)
    if hit is None:
        stored = json.loads(stored_json)
        decision = rules.decision_from_dict(stored["decision"])
        shown = rules.Circumstances(registry_extracted_on=decision.circumstances.registry_extracted_on,
                                    facts_source=decision.circumstances.facts_source)
        snap = stored.get("registry_snapshot")
        hit = (replace(decision, circumstances=shown),
               SnapshotRef(snap["id"], dt.date.fromisoformat(snap["extracted_on"])) if snap else None)
        if len(_LISTED_DECISIONS) >= _LISTED_DECISIONS_MAX:
            _LISTED_DECISIONS.clear()
        _LISTED_DECISIONS[key] = hit
    return hit


def list_activations(ctx: Context, caller: Caller, f: ActivationFilter, size: int,
                     token: str) -> tuple[list[ListedActivation], str]:
    """One page, newest first, and the token of the next ("" on the last). One statement on the
    autocommit pool: it reads one consistent snapshot, and the next page's token is taken from
    the rows it returned."""
    size = page_size(size, default=50, maximum=500)
    filters = asdict(f) | {"caller": caller.id}
    tokens = _tokens(ctx)
    position = tokens.read(token, "activations", filters)
    funder, programs = _scope(ctx, caller, f.funder, f.program_id)
    today = ctx.clock.today()
    params: dict[str, Any] = {"limit": size + 1}
    if programs is not None:
        params["programs"] = programs
    if funder:
        params["funder"] = funder
    if f.agency_code:
        params["agency_code"] = f.agency_code
    if f.state:
        params["state"], params["today"] = f.state, today
    if f.created_from:
        params["created_from"] = f.created_from
    if f.created_to:
        params["created_to"] = f.created_to
    if position:
        params["after_time"], params["after_id"] = dt.datetime.fromisoformat(position[0]), position[1]
    q = _listed_query((programs is not None, bool(funder), bool(f.agency_code), f.state, bool(f.created_from),
                       bool(f.created_to), bool(position)))
    with ctx.db.snapshot() as conn:
        rows = conn.execute(q, params).all()
    more = len(rows) > size
    if more:
        del rows[size:]
    ref = ctx.pseudo.person_ref
    items = []
    for (aid, program_id, state, person_key, advisor_id, agency_code, start_date, end_date, created_at, updated_at,
         platform_id, account_id, redeemed_at, stored, state_reason) in rows:
        state_reason = effective_reason(state, end_date, state_reason, today)
        if state in LIVE and end_date < today:
            state = "expired"  # activation.effective_state
        decision, snapshot = _listed_decision(stored)
        items.append(ListedActivation(
            aid, program_id, state, ref(person_key), advisor_id, agency_code, start_date, end_date, created_at,
            updated_at, platform_id, account_id, redeemed_at, decision, snapshot, state_reason))
    next_token = ""
    if more:
        last = items[-1]
        next_token = tokens.issue("activations", filters, [utc(last.created_at).isoformat(), last.id])
    return items, next_token


def _month_bounds(label: str) -> tuple[dt.date, dt.date]:
    """First and last day of the calendar month `YYYY-MM`."""
    first = dt.date(int(label[:4]), int(label[5:7]), 1)
    following = dt.date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, following - dt.timedelta(days=1)


def _months_between(first: str, last: str) -> list[str]:
    out, (y, m) = [], (int(first[:4]), int(first[5:7]))
    while f"{y:04d}-{m:02d}" <= last:
        out.append(f"{y:04d}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def _day_start(day: dt.date, tz: ZoneInfo) -> dt.datetime:
    """The instant (UTC) the civil day begins in the service's time zone."""
    return dt.datetime.combine(day, dt.time(0), tzinfo=tz).astimezone(dt.timezone.utc)


def funding_report(ctx: Context, caller: Caller, funder: str, program_id: str, start_month: str,
                   end_month: str) -> list[ReportRow]:
    """Money from the ledger, and activations live and ended, per funder x program x month. An
    activation belongs to the funders its commitment was booked for (its `commit` entries). Its
    access ends on its end date (as curtailed, if it was), or when it is revoked; a revocation
    counts on the civil day (service time zone) of the activation's last update, which for a
    revoked activation is its revocation (revoked is final).

    Read from the rollup every write keeps (entitlement/rollup.py): a few thousand rows whatever
    the number of activations. The activity columns are recomputed from the raw rows instead
    when the rollup counts days in another time zone than the service's."""
    for name, value in (("start_month", start_month), ("end_month", end_month)):
        if value and not MONTH_RE.fullmatch(value):
            raise InvalidArgument.single(name, "expected YYYY-MM, from 2000-01 to 2099-12")
    if start_month and end_month and start_month > end_month:
        raise InvalidArgument.single("end_month", "is before start_month")
    funder, programs = _scope(ctx, caller, funder, program_id)
    today = ctx.clock.today()
    rows: dict[tuple[str, str, str], ReportRow] = {}
    # One snapshot for the money and the activity (PostgreSQL): read by separate statements, a
    # revocation committing between them was counted ended with its release missing.
    with ctx.db.read(consistent=True) as s:
        for (f, p, m), cols in rollup.money(s, funder, programs, start_month, end_month).items():
            rows[(f, p, m)] = ReportRow(f, p, m, **cols)
        # Activations live and ended: from the first month of the ledger in scope (nothing starts
        # before its commitment is booked) to the last month asked for, never after this one.
        first = start_month
        if not first:
            fq = select(func.min(ReportMonth.month)).where(ReportMonth.activations_started > 0)
            if funder:
                fq = fq.where(ReportMonth.funder_id == funder)
            if programs is not None:
                fq = fq.where(ReportMonth.program_id.in_(programs))
            first = s.execute(fq).scalar_one_or_none() or ""
        last = min(end_month or "9999-12", today.strftime("%Y-%m"))
        months = _months_between(first, last) if first else []
        if rollup.stored_timezone(s) == ctx.settings.timezone:
            counts = rollup.activity_by_month(s, funder, programs, months, today)
        else:
            counts = _activity_from_rows(s, ZoneInfo(ctx.settings.timezone), funder, programs, months, today)
    for key, (n_live, n_ended) in counts.items():
        if key not in rows and not n_ended:
            continue  # no money that month and nothing ended: no row
        row = rows.get(key) or ReportRow(*key, 0, 0, 0, 0)
        rows[key] = replace(row, activations_live=n_live, activations_ended=n_ended)
    return [rows[k] for k in sorted(rows)]


def _activity_from_rows(s: Session, tz: ZoneInfo, funder: str, programs: list[str] | None, months: list[str],
                        today: dt.date) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(live, ended) per funder x program x month from the activations and their `commit` entries
    (one scan of the activations committed up to each month): the definition the rollup keeps."""
    out: dict[tuple[str, str, str], tuple[int, int]] = {}
    commit = LedgerEntry
    for month in months:
        month_first, month_last = _month_bounds(month)
        day = min(month_last, today)  # live on the month's last day, or today for this month
        revoked = Activation.state == "revoked"
        live = and_(Activation.end_date >= day,
                    or_(~revoked, Activation.updated_at >= _day_start(day + dt.timedelta(days=1), tz)))
        ended = or_(and_(revoked, Activation.updated_at >= _day_start(month_first, tz),
                         Activation.updated_at < _day_start(month_last + dt.timedelta(days=1), tz)),
                    and_(~revoked, Activation.end_date <= month_last, Activation.end_date < today))
        aq = (select(commit.funder_id, commit.program_id,
                     func.coalesce(func.sum(case((live, 1), else_=0)), 0),
                     func.coalesce(func.sum(case((ended, 1), else_=0)), 0))
              .join(Activation, Activation.id == commit.activation_id)
              .where(commit.kind == "commit", commit.month <= month, Activation.start_date <= day,
                     Activation.end_date >= month_first))
        if funder:
            aq = aq.where(commit.funder_id == funder)
        if programs is not None:
            aq = aq.where(commit.program_id.in_(programs))
        aq = aq.group_by(commit.funder_id, commit.program_id)
        for f, p, n_live, n_ended in s.execute(aq):
            out[(f, p, month)] = (int(n_live), int(n_ended))
    return out


def list_events(ctx: Context, caller: Caller, start_seq: int, size: int, token: str) -> tuple[list[EventView], str]:
    if start_seq < 0:
        raise InvalidArgument.single("start_sequence", "must not be negative")
    size = page_size(size, default=100, maximum=1000)
    filters = {"start": start_seq, "caller": caller.id}
    position = _tokens(ctx).read(token, "events", filters)
    after = int(position[0]) if position else start_seq - 1
    q = select(Event, LogNode.hash).outerjoin(LogNode, and_(LogNode.level == 0, LogNode.idx == Event.seq - 1))
    q = q.where(Event.seq > after)
    if caller.role == "funder":
        funder = caller.funder_id or ""
        q = q.where(readable_event(Event, funder, funded_programs(ctx, funder)))
    q = q.order_by(Event.seq).limit(size + 1)
    with ctx.db.read() as s:
        rows = list(s.execute(q).all())
    more = len(rows) > size
    rows = rows[:size]
    next_token = _tokens(ctx).issue("events", filters, [rows[-1][0].seq]) if more else ""
    return [EventView(e.seq, utc(e.time), e.type, e.actor, e.subject, e.reason, e.payload_json, e.program_id or "",
                      bytes(leaf) if leaf is not None else b"")
            for e, leaf in rows], next_token
