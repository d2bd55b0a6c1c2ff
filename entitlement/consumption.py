"""What funders owe for an activation, as pure functions (no I/O, like entitlement.rules).

Months of access. An activation's access is cut into months from its start day
(`rules.add_months`): one starting on 16 March has the months 16 March - 15 April, 16 April -
15 May, ..., the last one ending on the end date. Each month is named by the calendar month it
begins in (`2026-03`, `2026-04`, ...): that name is the `month` of its consume entries in the
ledger and of the platform's usage reports (ReportUsage).

Access on. Access is on from the start day, off from a suspension until a resumption, and off for
good after a revocation or the end date. A day counts as on when access was on at any moment of it
(the days of a suspension, of a resumption and of a revocation are on). A month of access is
*accessible* when at least one of its days was on: a month suspended from its first day to its
last is never owed.

What is owed, by the program's `funders_owe` (the value in force on the activation's start, kept
with its decision):
- `access`: every accessible month of access, as soon as it has begun.
- `use`: every accessible month the platform reports as used, at most `usage_report_days` days
  after the month ended; a month not reported used by then is not owed.

Money. The activation committed `months x price` when it started, split between its funders by
their shares (largest remainder, `money.split_cents`). Every month is *closed* once: consumed
(owed) or released (never owed); months not yet closed are reserved. Closing months books the
price of each, split between the funders in proportion to what each has left (committed - closed;
`money.split_by_weights`, the same largest-remainder rule), the last closing exactly what is left
(`closing`): each month's entries add up to the price to the cent, no amount is negative or more
than its funder has left, and once every month is closed each funder's consumed + released equals
its commitment exactly. So at any time, per funder: committed = consumed + released + reserved,
each of them >= 0.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from entitlement.money import split_by_weights
from entitlement.programs import DEFAULTS
from entitlement.rules import Decision, add_months

ONE_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class AccessMonth:
    index: int  # 0 for the first month of access
    label: str  # YYYY-MM of its first day
    first: dt.date
    last: dt.date  # inclusive, never after the activation's end date


@dataclass(frozen=True)
class Transition:
    """A change of access from the event log: `suspend`, `resume` or `end` (revocation), by day."""

    day: dt.date
    kind: str


@dataclass(frozen=True)
class Terms:
    """What an activation committed and on which basis funders owe it."""

    basis: str  # access | use
    report_days: int
    price_cents: int
    months: int
    shares_bp: Mapping[str, int]


@dataclass(frozen=True)
class Assessment:
    to_consume: tuple[AccessMonth, ...]  # owed now and not consumed yet, in order
    open_months: int  # months not closed that may still be owed: they stay reserved


def terms_of(decision: Decision) -> Terms | None:
    """The terms stored with an activation's decision (None without a funding plan). Activations
    made before `funders_owe` existed owe months of access, the default."""
    plan = decision.funding_plan
    if plan is None:
        return None
    params = {p.name: json.loads(p.value_json) for p in decision.parameters}
    return Terms(basis=str(params.get("funders_owe", DEFAULTS["funders_owe"])),
                 report_days=int(params.get("usage_report_days", DEFAULTS["usage_report_days"])),
                 price_cents=plan.price_per_month_cents, months=plan.months,
                 shares_bp={f: bp for f, bp, _ in plan.shares})


def access_months(start: dt.date, months: int, end: dt.date) -> tuple[AccessMonth, ...]:
    """The months of access of an activation from `start` to `end` (at most `months`)."""
    out = []
    for k in range(months):
        first = add_months(start, k)
        if first > end:
            break
        last = min(add_months(start, k + 1) - ONE_DAY, end)
        out.append(AccessMonth(k, first.strftime("%Y-%m"), first, last))
    return tuple(out)


def on_periods(start: dt.date, transitions: Iterable[Transition], until: dt.date) -> list[tuple[dt.date, dt.date]]:
    """The periods (first day, last day, inclusive) during which access was on, up to `until`.
    Transitions after `until` are ignored: the answer is as of that day."""
    periods: list[tuple[dt.date, dt.date]] = []
    on, since = True, start
    for t in sorted(transitions, key=lambda t: t.day):  # stable: same-day order is the log's
        if t.day > until:
            break
        if t.kind == "suspend" and on:
            periods.append((since, t.day))
            on = False
        elif t.kind == "resume" and not on:
            on, since = True, t.day
        elif t.kind == "end":
            if on:
                periods.append((since, t.day))
            on = False
            break
    if on:
        periods.append((since, until))
    return [(a, min(b, until)) for a, b in periods if a <= until]


def accessible(month: AccessMonth, periods: Sequence[tuple[dt.date, dt.date]]) -> bool:
    """Access was on for at least one day of the month (up to the periods' horizon)."""
    return any(a <= month.last and b >= month.first for a, b in periods)


def month_of(label: str, months: Sequence[AccessMonth]) -> AccessMonth | None:
    return next((m for m in months if m.label == label), None)


def report_deadline(terms: Terms, month: AccessMonth) -> dt.date:
    """Last day a month's use may be reported (`use` programs)."""
    return month.last + dt.timedelta(days=terms.report_days)


def assess(terms: Terms, start: dt.date, end: dt.date, transitions: Sequence[Transition],
           consumed: set[str], today: dt.date, live: bool) -> Assessment:
    """As of `today`: the months owed and not consumed yet (`access` only: under `use` the usage
    reports consume), and how many months not closed may still be owed.

    `live`: access may still be on after today (active or suspended, end date not passed);
    `transitions` include the revocation, if any, as an `end`."""
    periods = on_periods(start, transitions, min(today, end))
    to_consume = []
    open_months = 0
    for m in access_months(start, terms.months, end):
        if m.label in consumed:
            continue
        was_on = m.first <= today and accessible(m, periods)
        still_possible = live and today <= m.last  # not over yet: access may (again) be on in it
        if terms.basis == "access":
            if was_on:
                to_consume.append(m)
            elif still_possible:
                open_months += 1
        elif (was_on or still_possible) and today <= report_deadline(terms, m):
            open_months += 1
    return Assessment(tuple(to_consume), open_months)


def closing(terms: Terms, committed: Mapping[str, int], closed: Mapping[str, int],
            months_closed: int) -> dict[str, int]:
    """Per funder, what to book so that `months_closed` months are closed in all, given what each
    committed and has already closed (consumed + released).

    The cents to close (`months_closed` x price, less what is closed) are split in proportion to
    what each funder has left (committed - closed; money.split_by_weights), and the last closing
    books exactly what is left. So every amount is between 0 and what its funder has left: a funder
    never closes more than it committed, nor a negative amount. (Split by the fixed shares instead,
    as split(j x price) - split((j - 1) x price), a funder whose share of a month is under a cent
    could get -1 cent in a later month, three funders or more: the largest-remainder rule is not
    monotonic (found by a review: 3 / 9996 / 1 bp at 15 EUR, the fourth month booked -1 cent for
    the third funder, who had consumed 1 cent of a 0-cent commitment by then).)"""
    left = {f: committed.get(f, 0) - closed.get(f, 0) for f in sorted(terms.shares_bp)}
    cents = months_closed * terms.price_cents - sum(closed.values())
    if cents <= 0:
        return dict.fromkeys(left, 0)
    reserved = sum(max(v, 0) for v in left.values())
    if cents >= reserved:  # the last closing (or commitments short of the plan: never more than left)
        return {f: max(v, 0) for f, v in left.items()}
    return split_by_weights(cents, {f: max(v, 0) for f, v in left.items()})
