"""ReportUsage: the course platform says, per account and month of access, whether the learner used
Premium. Under programs whose funders owe months of use (`funders_owe: use`) a month reported used
is consumed in the ledger; under `access` programs the reports change nothing (every month of
access begun is owed anyway) but are checked the same way.

The rules (entitlement.consumption has the months and the money):
- the account must be bound to an activation of the calling platform, else NOT_FOUND (the same
  answer for another platform's accounts: nothing leaks);
- `month` names a month of access of that activation (the calendar month it begins in) that has
  begun; when the account holds several activations with such a month (one per program at once,
  e.g. OpenCFA and premium; a new one after a revocation), `program` (optional) restricts them to
  that program's, and the report is for one during which access was on in that month, else one
  merely having it; each time a `use` program's activation first (a report changes nothing under
  `access`: sent there, a month of use would never be billed), then the most recent;
- idempotent: the same report again changes nothing; `used = false` for a month already consumed
  contradicts it and is refused (FAILED_PRECONDITION, `USAGE_ALREADY_CONSUMED`); `used = false`
  for a month not consumed records nothing (the month is released when its report window closes);
- `used = true` is refused for a month during which access was never on (`NO_ACCESS_IN_MONTH`) and
  after its report window (`REPORT_WINDOW_CLOSED`: `usage_report_days` after the month ended),
  judged on the day the report holds the account's activations (locked), not the day it arrived.
- a report that consumes a month writes one `ledger.consumed` event (actor: the platform; payload:
  the month and the cents per funder, never the account id) in the same transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from entitlement import consumption, eventlog, inflight, ledger
from entitlement.activation import _replay, _remember, _request_hash, _with_retry
from entitlement.app import Context
from entitlement.callers import Caller
from entitlement.errors import FailedPrecondition, NotFound
from entitlement.storage.models import Activation


@dataclass(frozen=True)
class UsageReport:
    account_id: str
    month: str  # YYYY-MM
    used: bool
    request_id: str = ""
    program_id: str = ""  # empty: any program's activation (see _choose)


@dataclass(frozen=True)
class UsageOutcome:
    activation_id: str
    consumed: bool  # this report consumed the month now


def report_usage(ctx: Context, caller: Caller, report: UsageReport) -> UsageOutcome:
    fields: dict[str, object] = {"a": report.account_id, "m": report.month, "u": report.used}
    if report.program_id:  # only when given: the digests stored before the field existed still match
        fields["p"] = report.program_id
    digest = _request_hash("report_usage", fields)
    with inflight.claim(ctx.db, caller.id, report.request_id):
        result: UsageOutcome = _with_retry(_report_once, ctx, caller, report, digest)
    return result


def _not_found(account_id: str, program_id: str) -> NotFound:
    if not program_id:
        return NotFound(f"no entitlement of this platform is bound to account {account_id}",
                        reason="ACCOUNT_NOT_FOUND", metadata={"account_id": account_id})
    # The same answer whether the account is unknown, another platform's, or holds no activation of
    # the program (or the program does not exist): nothing leaks.
    return NotFound(f"no entitlement of this platform in programs/{program_id} is bound to account {account_id}",
                    reason="ACCOUNT_NOT_FOUND",
                    metadata={"account_id": account_id, "program": f"programs/{program_id}"})


def _report_once(ctx: Context, caller: Caller, report: UsageReport, digest: str) -> UsageOutcome:
    with ctx.db.write() as s:
        inflight.lock(s, caller.id, report.request_id)
        replay = _replay(s, caller, report.request_id, "report_usage", digest)
        if replay is not None:
            return UsageOutcome(replay["activation_id"], False)
        query = select(Activation).where(
            Activation.platform_id == caller.platform_id, Activation.account_id == report.account_id)
        if report.program_id:
            query = query.where(Activation.program_id == report.program_id)
        candidates = s.execute(query.order_by(Activation.start_date.desc(), Activation.created_at.desc())
                               .with_for_update()).scalars().all()
        if not candidates:
            raise _not_found(report.account_id, report.program_id)
        # The day, once the rows are held: a report that waited for them while the settlement job,
        # at midnight, released a month whose window had just closed is judged by the new day (by
        # the day it arrived, that month was consumed after its release: closed twice).
        today = ctx.clock.today()
        chosen = _choose(ctx, s, candidates, report.month, today)
        if chosen is None:
            raise FailedPrecondition(
                f"{report.month} is not a month of access of this account's entitlement (months of access "
                "are named by the calendar month they begin in)", reason="MONTH_OUTSIDE_ACCESS",
                metadata={"month": report.month})
        a, month, was_on = chosen
        if month.first > today:
            raise FailedPrecondition(f"the month of access {report.month} begins on {month.first.isoformat()}",
                                     reason="MONTH_NOT_BEGUN", metadata={"month": report.month})
        t = ledger.terms(a)
        assert t is not None
        consumed = False
        if t.basis == "use":
            already = month.label in ledger.balances(s, a.id).consumed_months
            if not report.used and already:
                raise FailedPrecondition(
                    f"{report.month} was reported used and is consumed; a report cannot take it back",
                    reason="USAGE_ALREADY_CONSUMED", metadata={"month": report.month})
            if report.used and not already:
                if not was_on:
                    raise FailedPrecondition(f"access was off during the whole of {report.month}",
                                             reason="NO_ACCESS_IN_MONTH", metadata={"month": report.month})
                deadline = consumption.report_deadline(t, month)
                if today > deadline:
                    raise FailedPrecondition(
                        f"the use of {report.month} could be reported until {deadline.isoformat()}",
                        reason="REPORT_WINDOW_CLOSED",
                        metadata={"month": report.month, "deadline": deadline.isoformat()})
                amounts = ledger.consume_month(s, ctx, a, month.label)
                consumed = True
                if any(amounts.values()):  # a change of the ledger: its own event, in this transaction
                    eventlog.append(s, time=ctx.clock.now(), type="ledger.consumed", actor=caller.actor,
                                    subject=f"activations/{a.id}", program_id=a.program_id,
                                    reason=f"use of {month.label} reported",
                                    payload={"consumed_months": [month.label],
                                             "consumed_cents": dict(sorted(amounts.items()))})
        _remember(s, ctx, caller, report.request_id, "report_usage", digest, {"activation_id": a.id})
        return UsageOutcome(a.id, consumed)


def _choose(ctx: Context, s: Session, candidates: Sequence[Activation], label: str,
            today: dt.date) -> tuple[Activation, consumption.AccessMonth, bool] | None:
    """An activation having a month of access `label` during which access was on, else one having
    that month at all; each time one of a `use` program first (under `access` a report changes
    nothing: a month of use reported there would never be billed), then the most recent
    (`candidates` come most recent first)."""
    found: list[tuple[Activation, consumption.AccessMonth, bool]] = []
    with_terms = [(a, t) for a in candidates if (t := ledger.terms(a)) is not None]
    with_terms.sort(key=lambda at: at[1].basis != "use")  # stable: recency kept within each basis
    for a, t in with_terms:
        month = consumption.month_of(label, consumption.access_months(a.start_date, t.months, a.end_date))
        if month is None:
            continue
        transitions = ledger.history(s, a, ctx.settings.timezone)
        periods = consumption.on_periods(a.start_date, transitions, min(today, a.end_date))
        was_on = month.first <= today and consumption.accessible(month, periods)
        if was_on:
            return a, month, True
        found.append((a, month, False))
    return found[0] if found else None
