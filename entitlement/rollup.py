"""The funding report's rollup: what GetFundingReport would otherwise compute from every ledger
entry and every activation committed up to a month, kept in two small tables in the transaction
of each change, so a report reads a few thousand rows at a million activations.

- `report_months` (funder x program x ledger month): cents committed, consumed and released,
  distinct activations with a `commit` (started) and with a `consume` (person-months).
- `report_days` (funder x program x civil day): the activity counters. Each `commit` entry of an
  activation (funder f, program p, month cm) contributes, with s = max(start date, first day of
  cm), e = its end date (as curtailed) and, if revoked, r = the civil day of its revocation (its
  last update, in the rollup's time zone):
    live span [s, L], L = e (revoked: min(e, r - 1)), if not empty: live_from +1 on s and
      live_until +1 on L + 1; live at the end of day D = sum of (live_from - live_until) up to D;
    revoked: ended_through +1 on max(s, first day of r's month) when e reaches r's month and s is
      not after it (counted in that month from that day on);
    otherwise: ended_before +1 on e when s <= e (counted in e's month once e is past), or
      ended_through +1 on s when s > e in the same month.
  For month M and today T, with D = min(last day of M, T): live = sum up to D; ended = the
  month's ended_before on days before min(last day of M + 1, T) plus its ended_through up to D.
  These are exactly the definitions of entitlement.audit's raw-row computation (kept as the
  fallback, and the reference of tests/test_funding_report.py).

Maintenance is a `before_flush` hook on the Database's sessions (entitlement.storage.db): every
new ledger entry, and every change of an activation's start date, end date, state or last update,
updates the rollup in the same flush, so nothing written through the ORM can forget it. Rows are
upserted in key order; on PostgreSQL the event log's head row is locked first (every write
transaction takes it anyway), so writers never deadlock on rollup rows.
`entitlement doctor` compares the tables with `recompute` (from the raw rows); `entitlement db
rebuild-report` replaces them by it (`rebuild`: recomputed in a snapshot, caught up and swapped in
a short write transaction).
"""

from __future__ import annotations

import datetime as dt
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple
from zoneinfo import ZoneInfo

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import PassiveFlag, Session
from sqlalchemy.orm.attributes import get_history

from entitlement import eventlog
from entitlement.storage import direct
from entitlement.storage.models import (Activation, Event, LedgerEntry, LogHead, ReportDay, ReportMonth,
                                        ReportRollup)

if TYPE_CHECKING:
    from entitlement.storage.db import Database

DEFAULT_TIMEZONE = "Europe/Paris"
SPAN = ("start_date", "end_date", "state", "updated_at")
MONEY = ("activations_started", "committed_cents", "consumed_cents", "released_cents", "person_months_consumed")
ACTIVITY = ("live_from", "live_until", "ended_before", "ended_through")
CENTS = {"commit": "committed_cents", "consume": "consumed_cents", "release": "released_cents"}
DISTINCT = {"commit": "activations_started", "consume": "person_months_consumed"}
CHUNK = 200  # rows per multi-row upsert

MonthKey = tuple[str, str, str]  # funder, program, YYYY-MM
DayKey = tuple[str, str, dt.date]  # funder, program, day


@dataclass(frozen=True)
class Span:
    """What the counts read of an activation."""

    start_date: dt.date
    end_date: dt.date
    state: str
    updated_at: dt.datetime

    @staticmethod
    def of(row: Any) -> Span:
        updated = row.updated_at
        updated = updated if updated.tzinfo else updated.replace(tzinfo=dt.timezone.utc)  # SQLite: naive UTC
        return Span(row.start_date, row.end_date, row.state, updated.astimezone(dt.timezone.utc))


def month_first(label: str) -> dt.date:
    return dt.date(int(label[:4]), int(label[5:7]), 1)


def month_last(day: dt.date) -> dt.date:
    following = dt.date(day.year + day.month // 12, day.month % 12 + 1, 1)
    return following - dt.timedelta(days=1)


def activity(span: Span, commit_month: str, tz: ZoneInfo) -> list[tuple[dt.date, str]]:
    """The (day, counter) contributions of one `commit` entry (see the module docstring)."""
    return activity_of(span.start_date, span.end_date, revocation_day(span.state, span.updated_at, tz), commit_month)


def revocation_day(state: str, updated_at: dt.datetime, tz: ZoneInfo) -> dt.date | None:
    """A revoked activation's civil day of revocation (its last update) in `tz`; None otherwise.
    A naive time is UTC (as SQLite gives it back)."""
    if state != "revoked":
        return None
    return (updated_at if updated_at.tzinfo else updated_at.replace(tzinfo=dt.timezone.utc)).astimezone(tz).date()


def activity_of(start: dt.date, end: dt.date, revoked_on: dt.date | None,
                commit_month: str) -> list[tuple[dt.date, str]]:
    """`activity` from what it depends on: the dates, and for a revoked activation the civil day
    (in the rollup's time zone) of its revocation, its last update."""
    s = max(start, month_first(commit_month))
    e = end
    out: list[tuple[dt.date, str]] = []
    r = revoked_on
    last_live = e if r is None else min(e, r - dt.timedelta(days=1))
    if s <= last_live:
        out += [(s, "live_from"), (last_live + dt.timedelta(days=1), "live_until")]
    if r is not None:
        first = r.replace(day=1)
        if e >= first and s <= month_last(r):
            out.append((max(s, first), "ended_through"))
    elif s <= e:
        out.append((e, "ended_before"))
    elif (s.year, s.month) == (e.year, e.month):
        out.append((s, "ended_through"))
    return out


# ------------------------------------------------------------------------------------ maintenance

_TIMEZONE = select(ReportRollup.timezone).where(ReportRollup.id == 1)
_LOCK_LOG_HEAD = select(LogHead.id).where(LogHead.id == 1).with_for_update()


def stored_timezone(s: Session) -> str:
    """The rollup's time zone: as read with this transaction's event sequence number when it has
    one (entitlement.eventlog), else read now."""
    taken = eventlog.head_taken(s)
    if taken is not None and taken.timezone_read:
        tz = taken.rollup_timezone
    else:
        tz = s.connection().execute(_TIMEZONE).scalar_one_or_none()
    return tz or DEFAULT_TIMEZONE


def _span_touched(a: Activation) -> bool:
    """Whether this flush may move the activation's contributions: its dates or state changed, or
    the last update of a revoked one (the others' last update counts for nothing)."""
    # The histories alone, as `inspect(a).attrs[name].history` reads them (no loader emitted), without
    # building every attribute's AttributeState: those and the instance's state refer to each other,
    # a reference cycle per flushed activation for the cyclic collector (tests/test_cyclic_garbage.py).
    def changed(name: str) -> bool:
        return get_history(a, name, passive=PassiveFlag.PASSIVE_NO_INITIALIZE).has_changes()
    if any(changed(name) for name in ("start_date", "end_date", "state")):
        return True
    return a.state == "revoked" and changed("updated_at")


def before_flush(session: Session, _flush_context: Any, _instances: Any) -> None:
    """Bring the rollup up to date with what this flush writes (registered in storage.db)."""
    fresh: set[str] = session.info.setdefault("rollup_fresh", set())  # activations this session inserts
    fresh.update(o.id for o in session.new if isinstance(o, Activation))
    entries = [o for o in session.new if isinstance(o, LedgerEntry)]
    moved = sorted(o.id for o in session.dirty if isinstance(o, Activation) and _span_touched(o))
    if entries or moved:
        _apply(session, entries, moved, fresh)


class _Entry(NamedTuple):
    """A ledger entry written without the ORM, as _apply reads one."""

    activation_id: str
    funder_id: str
    program_id: str
    kind: str
    month: str
    amount_cents: int


def commitments(s: Session, activation_id: str, span: Span,
                entries: list[tuple[str, str, str, int]]) -> None:
    """Bring the rollup up to date with a new activation and its `commit` entries (funder, program,
    month, cents), inserted by the caller without the ORM (entitlement.activation): what the
    before_flush hook does for ORM objects, with the activation's span given (it is in no session).
    Call it after the transaction's event is appended."""
    fresh: set[str] = s.info.setdefault("rollup_fresh", set())
    fresh.add(activation_id)
    _apply(s, [_Entry(activation_id, funder, program, "commit", month, cents)
               for funder, program, month, cents in entries], [], fresh, {activation_id: Span.of(span)})


def _apply(s: Session, entries: Sequence[LedgerEntry | _Entry], moved: list[str], fresh: set[str],
           spans: dict[str, Span] | None = None) -> None:
    """`spans`: the spans of new activations the session does not hold (commitments)."""
    tz = ZoneInfo(stored_timezone(s))
    months: dict[MonthKey, dict[str, int]] = defaultdict(lambda: dict.fromkeys(MONEY, 0))
    days: dict[DayKey, dict[str, int]] = defaultdict(lambda: dict.fromkeys(ACTIVITY, 0))
    # What is already in the database (flushed by this transaction included; this flush is not).
    # An activation this session inserted has no entries but those its earlier flushes wrote,
    # which the session remembers: no query for a new activation's commitment.
    flushed: set[tuple[str, str, str, str]] = s.info.setdefault("rollup_flushed", set())
    ids = sorted({e.activation_id for e in entries if e.kind in DISTINCT and e.activation_id not in fresh}
                 | set(moved))
    existing = s.execute(select(LedgerEntry.activation_id, LedgerEntry.funder_id, LedgerEntry.program_id,
                                LedgerEntry.kind, LedgerEntry.month)
                         .where(LedgerEntry.activation_id.in_(ids), LedgerEntry.kind.in_(list(DISTINCT)))).all() \
        if ids else []
    if moved:
        before = {r.id: Span.of(r) for r in s.execute(
            select(Activation.id, *(getattr(Activation, c) for c in SPAN)).where(Activation.id.in_(moved)))}
        now = {aid: Span.of(s.get(Activation, aid)) for aid in moved}
        for aid, funder, program, kind, month in existing:
            if kind != "commit" or aid not in before or before[aid] == now[aid]:
                continue
            for day, counter in activity(before[aid], month, tz):
                days[(funder, program, day)][counter] -= 1
            for day, counter in activity(now[aid], month, tz):
                days[(funder, program, day)][counter] += 1
    seen = {(aid, funder, kind, month) for aid, funder, _p, kind, month in existing} | flushed
    pending = {o.id: o for o in s.new if isinstance(o, Activation)}
    for e in entries:
        row = months[(e.funder_id, e.program_id, e.month)]  # the row exists once any entry does
        if e.kind in CENTS:
            row[CENTS[e.kind]] += int(e.amount_cents)
        if e.kind in DISTINCT and (e.activation_id, e.funder_id, e.kind, e.month) not in seen:
            seen.add((e.activation_id, e.funder_id, e.kind, e.month))
            row[DISTINCT[e.kind]] += 1
            if e.activation_id in fresh:
                flushed.add((e.activation_id, e.funder_id, e.kind, e.month))
        if e.kind == "commit":
            span = spans.get(e.activation_id) if spans else None
            if span is None:
                a = pending.get(e.activation_id) or s.get(Activation, e.activation_id)
                if a is None:
                    continue  # the foreign key refuses the entry at this very flush
                span = Span.of(a)
            for day, counter in activity(span, e.month, tz):
                days[(e.funder_id, e.program_id, day)][counter] += 1
    day_rows = {k: v for k, v in days.items() if any(v.values())}
    if not months and not day_rows:
        return
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql" and not eventlog.holds_log_head(s):
        # Every write transaction takes the event log's head row (entitlement.eventlog) before it
        # commits: taking it first here queues rollup writers on it, so rollup rows are always
        # locked after it and two writers never deadlock on them. (Skipped, a round trip saved,
        # when this transaction's event already holds it: the usual case of an activation.)
        direct.of(s).all(_LOCK_LOG_HEAD)
    _upsert(s, dialect, ReportMonth, ("funder_id", "program_id", "month"), MONEY, months)
    _upsert(s, dialect, ReportDay, ("funder_id", "program_id", "day"), ACTIVITY, day_rows)


def _upsert_statement(dialect: str, model: Any, keys: tuple[str, ...], columns: tuple[str, ...]) -> Any:
    table = model.__table__
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table)
    return stmt.on_conflict_do_update(index_elements=list(keys),
                                      set_={c: table.c[c] + stmt.excluded[c] for c in columns})


# Built once per backend and table: every write transaction runs them (executemany of its rows).
_UPSERTS: dict[tuple[str, Any], Any] = {}


def _upsert(s: Session, dialect: str, model: Any, keys: tuple[str, ...], columns: tuple[str, ...],
            deltas: dict[Any, dict[str, int]]) -> None:
    """Add `deltas` to the rows of their keys (created at zero), in key order."""
    stmt = _UPSERTS.get((dialect, model))
    if stmt is None:
        stmt = _UPSERTS[(dialect, model)] = _upsert_statement(dialect, model, keys, columns)
    rows = [dict(zip(keys, key)) | deltas[key] for key in sorted(deltas)]
    st = direct.of(s)
    for i in range(0, len(rows), CHUNK):
        st.execute_many(stmt, rows[i:i + CHUNK])


# --------------------------------------------------------------------------- recompute, rebuild

# Grouped in the order of ix_ledger_kind_funder_month_cents, which holds every column read: both
# backends read that index alone, in order, instead of sorting every entry (migration 0011).
MONEY_QUERY = (select(LedgerEntry.kind, LedgerEntry.funder_id, LedgerEntry.program_id, LedgerEntry.month,
                      func.sum(LedgerEntry.amount_cents), func.count(func.distinct(LedgerEntry.activation_id)))
               .group_by(LedgerEntry.kind, LedgerEntry.funder_id, LedgerEntry.program_id, LedgerEntry.month))


def _money(s: Session, activations: Sequence[str] | None = None) -> dict[MonthKey, dict[str, int]]:
    """Every ledger entry's money; `activations`: only theirs (a count of distinct activations
    adds up over disjoint sets of them: `_catch_up`)."""
    out: dict[MonthKey, dict[str, int]] = defaultdict(lambda: dict.fromkeys(MONEY, 0))
    for q in _restricted(MONEY_QUERY, activations):
        for kind, funder, program, month, cents, distinct in s.execute(q):
            row = out[(funder, program, month)]
            if kind in CENTS:
                row[CENTS[kind]] += int(cents)
            if kind in DISTINCT:
                row[DISTINCT[kind]] += int(distinct)
    return dict(out)


def _restricted(query: Any, activations: Sequence[str] | None) -> Iterator[Any]:
    """`query`, or its versions for `activations`, 500 at a time."""
    if activations is None:
        yield query
        return
    ids = sorted(set(activations))
    for i in range(0, len(ids), 500):
        yield query.where(LedgerEntry.activation_id.in_(ids[i:i + 500]))


def _activity(s: Session, tz: ZoneInfo, activations: Sequence[str] | None = None) -> dict[DayKey, dict[str, int]]:
    """Every `commit` entry's contributions (`activations`: only theirs). Entries of the same
    funder, program and month whose activations share their dates (and, revoked, the day of their
    revocation) contribute alike: counted first, then computed once per distinct kind. At 200,000
    activations (bench.activations' fill) 13.9-14.7 s before, 5.7-7.3 s after, on both backends
    (docs/PERFORMANCE-LOG.md, twenty-first session)."""
    q = (select(LedgerEntry.funder_id, LedgerEntry.program_id, LedgerEntry.month,
                *(getattr(Activation, c) for c in SPAN))
         .join(Activation, Activation.id == LedgerEntry.activation_id).where(LedgerEntry.kind == "commit"))
    alike: dict[tuple[str, str, str, dt.date, dt.date, dt.date | None], int] = defaultdict(int)
    for part in _restricted(q, activations):
        for funder, program, month, start, end, state, updated in s.execute(part.execution_options(yield_per=20_000)):
            alike[(funder, program, month, start, end, revocation_day(state, updated, tz))] += 1
    out: dict[DayKey, dict[str, int]] = defaultdict(lambda: dict.fromkeys(ACTIVITY, 0))
    for (funder, program, month, start, end, revoked_on), n in alike.items():
        for day, counter in activity_of(start, end, revoked_on, month):
            out[(funder, program, day)][counter] += n
    return {k: v for k, v in out.items() if any(v.values())}


def recompute(s: Session, timezone: str | None = None) -> tuple[dict[MonthKey, dict[str, int]],
                                                                dict[DayKey, dict[str, int]]]:
    """The rollup as it must be, from the raw rows (ledger entries and activations)."""
    return _money(s), _activity(s, ZoneInfo(timezone or stored_timezone(s)))


def stored(s: Session) -> tuple[dict[MonthKey, dict[str, int]], dict[DayKey, dict[str, int]]]:
    """The rollup as stored (all-zero day rows left by moves are no counts)."""
    months = {(r.funder_id, r.program_id, r.month): {c: int(getattr(r, c)) for c in MONEY}
              for r in s.execute(select(ReportMonth)).scalars()}
    days = {(r.funder_id, r.program_id, r.day): {c: int(getattr(r, c)) for c in ACTIVITY}
            for r in s.execute(select(ReportDay)).scalars()}
    return months, {k: v for k, v in days.items() if any(v.values())}


def differences(s: Session) -> Iterator[str]:
    """Keys where the stored rollup is not its recomputation, described without personal data."""
    want_months, want_days = recompute(s)
    have_months, have_days = stored(s)
    for name, want, have in (("report_months", want_months, have_months), ("report_days", want_days, have_days)):
        for key in sorted(set(want) | set(have), key=str):
            if want.get(key) != have.get(key):
                yield f"{name} {'/'.join(map(str, key))}: stored {have.get(key)}, raw rows say {want.get(key)}"


@dataclass
class Recomputed:
    """The rollup recomputed in `timezone` from one snapshot of the database: the one whose event
    log held `size` events (every change of an activation or of its ledger is logged, as
    `activations/<id>`, in the transaction that makes it)."""

    timezone: str
    size: int
    months: dict[MonthKey, dict[str, int]]
    days: dict[DayKey, dict[str, int]]


def recompute_snapshot(snapshot: Session, timezone: str) -> Recomputed:
    """`recompute` in a read transaction of one snapshot (Database.read(consistent=True)), with the
    size of its event log. Takes no lock: writers go on meanwhile."""
    ZoneInfo(timezone)  # a bad name fails before anything is read
    size = _log_size(snapshot)
    months, days = recompute(snapshot, timezone)
    return Recomputed(timezone, size, months, days)


def replace(s: Session, snapshot: Session, r: Recomputed) -> tuple[int, int]:
    """Replace the rollup by `r` (recomputed in `snapshot`, still open), brought up to date with
    what was committed since: in `s`, a write transaction, the event log's head is taken first (as
    every writer of the rollup takes it: writers wait, so none of their updates falls between the
    catch-up and the replacement: lost, before, found by a review), then each activation an event
    after `r.size` names has its contributions as of the snapshot (read in `snapshot`) taken out
    and its contributions now put in. Returns the number of month and day rows written."""
    size = _log_size(s, lock=True)
    months, days = _catch_up(s, snapshot, r, size)
    s.execute(delete(ReportMonth))
    s.execute(delete(ReportDay))
    s.execute(delete(ReportRollup))
    s.add(ReportRollup(id=1, timezone=r.timezone))
    eventlog.forget_head(s)  # a time zone read with an event of this transaction is no longer current
    s.flush()
    for model, keys, rows in ((ReportMonth, ("funder_id", "program_id", "month"), months),
                              (ReportDay, ("funder_id", "program_id", "day"), days)):
        batch = [dict(zip(keys, k)) | v for k, v in sorted(rows.items())]
        for i in range(0, len(batch), 5000):
            s.execute(model.__table__.insert(), batch[i:i + 5000])
    return len(months), len(days)


_PREFIX = "activations/"


def _catch_up(s: Session, snapshot: Session, r: Recomputed,
              size: int) -> tuple[dict[MonthKey, dict[str, int]], dict[DayKey, dict[str, int]]]:
    """`r`'s rollup plus what the events after its snapshot, up to `size`, changed. Month rows are
    never dropped (ledger entries are never deleted: a month row, once any entry has it, is kept
    by the recomputation); day rows whose counters come back to zero are."""
    months = {k: dict(v) for k, v in r.months.items()}
    days = {k: dict(v) for k, v in r.days.items()}
    if size <= r.size:
        return months, days
    touched = sorted({subject[len(_PREFIX):] for subject in s.execute(
        select(Event.subject).where(Event.seq > r.size, Event.seq <= size,
                                    Event.subject.startswith(_PREFIX, autoescape=True))).scalars()})
    if not touched:
        return months, days
    tz = ZoneInfo(r.timezone)
    for sign, session in ((-1, snapshot), (1, s)):
        for month_key, row in _money(session, touched).items():
            target = months.setdefault(month_key, dict.fromkeys(MONEY, 0))
            for c, n in row.items():
                target[c] += sign * n
        for day_key, row in _activity(session, tz, touched).items():
            target = days.setdefault(day_key, dict.fromkeys(ACTIVITY, 0))
            for c, n in row.items():
                target[c] += sign * n
    return months, {k: v for k, v in days.items() if any(v.values())}


# Catch-up passes made in newer snapshots, without the lock, while more than this many events came
# after the snapshot in hand: what is left for the locked one is what was written during the last.
UNLOCKED_BACKLOG = 500
UNLOCKED_PASSES = 4


def rebuild(db: Database, timezone: str) -> tuple[int, int]:
    """Replace the rollup by its recomputation in `timezone` (bulk loads, a time zone change),
    beside serving processes: recomputed in a read snapshot (no lock: 3.9 s on SQLite and 3.65 s on
    PostgreSQL at 200,000 activations, during which writers waited, before), brought up to date in
    newer snapshots while writers went on meanwhile (`catch_up`), then caught up with the rest and
    swapped in a short write transaction (`replace`). Two of `db`'s connections at once. Returns
    the number of month and day rows written."""
    with ExitStack() as held:
        snapshot = held.enter_context(db.read(consistent=True))
        r = recompute_snapshot(snapshot, timezone)
        for _ in range(UNLOCKED_PASSES):
            newer_held = ExitStack()
            newer = newer_held.enter_context(db.read(consistent=True))
            size = _log_size(newer)
            if size - r.size <= UNLOCKED_BACKLOG:
                newer_held.close()
                break
            r = catch_up(newer, snapshot, r, size)
            held.close()  # the older snapshot: its connection back to the pool
            held.enter_context(newer_held)
            snapshot = newer
        with db.write() as s:
            return replace(s, snapshot, r)


def catch_up(newer: Session, snapshot: Session, r: Recomputed, size: int) -> Recomputed:
    """`r` (recomputed, or caught up, in `snapshot`) brought up to date with `newer`, a later read
    snapshot whose event log holds `size` events, without a lock."""
    months, days = _catch_up(newer, snapshot, r, size)
    return Recomputed(r.timezone, size, months, days)


def _log_size(s: Session, *, lock: bool = False) -> int:
    """The event log's size; `lock`: its head row taken (as every writer takes it) until the
    transaction ends."""
    q = select(LogHead.size).where(LogHead.id == 1)
    return int(s.execute(q.with_for_update() if lock else q).scalar_one_or_none() or 0)


# ------------------------------------------------------------------------------------------ read

def money(s: Session, funder: str, programs: list[str] | None, start_month: str,
          end_month: str) -> dict[MonthKey, dict[str, int]]:
    q = select(ReportMonth)
    if funder:
        q = q.where(ReportMonth.funder_id == funder)
    if programs is not None:
        q = q.where(ReportMonth.program_id.in_(programs))
    if start_month:
        q = q.where(ReportMonth.month >= start_month)
    if end_month:
        q = q.where(ReportMonth.month <= end_month)
    return {(r.funder_id, r.program_id, r.month): {c: int(getattr(r, c)) for c in MONEY}
            for r in s.execute(q).scalars()}


def activity_by_month(s: Session, funder: str, programs: list[str] | None, months: Iterable[str],
                      today: dt.date) -> dict[MonthKey, tuple[int, int]]:
    """(live, ended) per funder x program x month, for the given months (none after today's)."""
    wanted = [m for m in months if month_first(m) <= today]
    if not wanted:
        return {}
    upto = min(month_last(month_first(max(wanted))), today)
    q = (select(ReportDay.funder_id, ReportDay.program_id, ReportDay.day,
                ReportDay.live_from - ReportDay.live_until, ReportDay.ended_before, ReportDay.ended_through)
         .where(ReportDay.day <= upto))
    if funder:
        q = q.where(ReportDay.funder_id == funder)
    if programs is not None:
        q = q.where(ReportDay.program_id.in_(programs))
    groups: dict[tuple[str, str], list[tuple[dt.date, int, int, int]]] = defaultdict(list)
    for f, p, day, live, before, through in s.execute(q):
        groups[(f, p)].append((day, int(live), int(before), int(through)))
    out: dict[MonthKey, tuple[int, int]] = {}
    for (f, p), rows in groups.items():
        rows.sort()
        dates = [r[0] for r in rows]
        prefix = [(0, 0, 0)]
        for _d, live, before, through in rows:
            last = prefix[-1]
            prefix.append((last[0] + live, last[1] + before, last[2] + through))

        def upto_day(day: dt.date, column: int) -> int:
            return prefix[bisect_right(dates, day)][column]

        for m in wanted:
            first = month_first(m)
            last_day = month_last(first)
            day = min(last_day, today)
            before_first = first - dt.timedelta(days=1)
            live = upto_day(day, 0)
            ended = (upto_day(min(last_day, today - dt.timedelta(days=1)), 1) - upto_day(before_first, 1)
                     + upto_day(day, 2) - upto_day(before_first, 2))
            out[(f, p, m)] = (live, ended)
    return out
