"""The funding ledger over an activation's life, on both backends, through the real server (a server
of this module's own: the jobs run over every activation and the clock moves freely):
consumption month by month (`access`) and on usage reports (`use`), suspensions skipping whole
months, revocation, expiry and revalidation releasing the rest. After each step the ledger is
recomputed from its raw entries: committed = consumed + released + reserved, per funder, to the
cent, and GetFundingReport says the same."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from own_server import default_people, next_ledger_person, on_day, own_server, write_registry
from support import Api, Harness, expect_error, identity, sqlite_writer_sees, wait_until
from test_audit_log import IDF, MINISTRY, export, verify

from entitlement import consumption, jobs, ledger, registry
from entitlement.clock import SystemClock
from entitlement.config import ROOT
from entitlement.money import split_cents
from entitlement.storage.models import Activation, Event, LedgerEntry, LogHead, ProgramCounter
from entitlement.v1 import activation_pb2, audit_pb2

PREMIUM, OPENCFA = "premium-job-seekers", "opencfa-apprentices"
FUNDERS = {PREMIUM: ("france-travail", "ministry-of-labour"), OPENCFA: ("opco-opcalia", "region-idf")}
PRICE, MONTHS = 2000, 12
HALF = PRICE // 2
D = dt.date


@pytest.fixture(scope="module")
def h(backend: tuple[str, str], tmp_path_factory: pytest.TempPathFactory,
      request: pytest.FixtureRequest) -> Iterator[Harness]:
    with own_server(backend[0], tmp_path_factory.mktemp(f"ledger-{backend[0]}"), request) as server:
        yield server


@pytest.fixture
def api(h: Harness) -> Api:
    return Api(h)


# ------------------------------------------------------------------------------------------ helpers

@dataclass(frozen=True)
class Money:
    """One activation's ledger from its raw entries, per funder."""

    committed: dict[str, int]
    consumed: dict[str, int]
    released: dict[str, int]
    consumed_months: list[str]

    @property
    def reserved(self) -> dict[str, int]:
        return {f: self.committed[f] - self.consumed[f] - self.released[f] for f in self.committed}


def money(h: Harness, name: str) -> Money:
    activation_id = name.split("/")[1]
    with h.ctx.db.read() as s:
        rows = s.execute(select(LedgerEntry).where(LedgerEntry.activation_id == activation_id)
                         .order_by(LedgerEntry.id)).scalars().all()
    sums: dict[str, dict[str, int]] = {k: defaultdict(int) for k in ("commit", "consume", "release")}
    by_month: dict[str, int] = defaultdict(int)
    for r in rows:
        sums[r.kind][r.funder_id] += r.amount_cents
        if r.kind == "consume":
            by_month[r.month] += r.amount_cents
    # Every month consumed is split between the funders to the cent.
    assert all(total == PRICE for total in by_month.values()), dict(by_month)
    funders = sorted(sums["commit"])
    m = Money({f: sums["commit"][f] for f in funders}, {f: sums["consume"][f] for f in funders},
              {f: sums["release"][f] for f in funders}, sorted(by_month))
    assert all(v >= 0 for v in m.reserved.values()), m
    return m


def each(cents: int, program: str = PREMIUM) -> dict[str, int]:
    """`cents` for each of the program's two funders (50/50)."""
    return {f: cents for f in FUNDERS[program]}


def expect(h: Harness, name: str, *, consumed: list[str], released_months: int,
           program: str = PREMIUM) -> Money:
    """The activation's raw ledger: `consumed` months consumed, `released_months` released, the rest
    reserved; committed = consumed + released + reserved per funder, to the cent."""
    m = money(h, name)
    assert m.consumed_months == consumed
    reserved_months = MONTHS - len(consumed) - released_months
    assert m.committed == each(MONTHS * HALF, program)
    assert m.consumed == each(len(consumed) * HALF, program)
    assert m.released == each(released_months * HALF, program)
    assert m.reserved == each(reserved_months * HALF, program)
    return m


def assert_report_matches_ledger(h: Harness, api: Api) -> None:
    """GetFundingReport (funder x program x month) equals the sums of the raw ledger entries, and
    per funder and program the ledger balances: committed = consumed + released + reserved >= 0."""
    with h.ctx.db.read() as s:
        rows = s.execute(select(LedgerEntry)).scalars().all()
    raw: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in rows:
        raw[(r.funder_id, r.program_id, r.month)][("commit", "consume", "release").index(r.kind)] += r.amount_cents
    report = api.admin.GetFundingReport(audit_pb2.GetFundingReportRequest())
    money_rows = [r for r in report.rows if r.committed_cents or r.consumed_cents or r.released_cents]
    # A row without money is there for the activations that ended that month.
    assert all(r.activations_ended > 0 for r in report.rows if r not in money_rows)
    seen = {(r.funder, r.program.split("/")[1], r.month): [r.committed_cents, r.consumed_cents, r.released_cents]
            for r in money_rows}
    assert seen == dict(raw)
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for (funder, program, _month), values in raw.items():
        totals[(funder, program)] = [a + b for a, b in zip(totals[(funder, program)], values)]
    for key, (committed, consumed, released) in totals.items():
        assert committed - consumed - released >= 0, key
    # The counter caps compare against: committed net of releases (consumed money stays spent).
    with h.ctx.db.read() as s:
        counters = {p: c for p, c in s.execute(select(ProgramCounter.program_id, ProgramCounter.cents_committed))}
    net: dict[str, int] = defaultdict(int)
    for (_funder, program), (committed, _consumed, released) in totals.items():
        net[program] += committed - released
    assert counters == dict(net)


def activate(api: Api, program: str = PREMIUM) -> activation_pb2.Activation:
    agency_id, birth = next_ledger_person()
    return api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=f"programs/{program}", platform="platforms/openclassrooms",
        reason="ledger test", mentor_id="M-0042" if program == OPENCFA else "")).activation


def activate_and_redeem(api: Api, program: str = PREMIUM) -> tuple[activation_pb2.Activation, str]:
    agency_id, birth = next_ledger_person()
    resp = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=f"programs/{program}", platform="platforms/openclassrooms",
        reason="ledger test", mentor_id="M-0042" if program == OPENCFA else ""))
    account = "learner-" + uuid.uuid4().hex[:12]
    api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=resp.activation_token, account_id=account))
    return resp.activation, account


def move(api: Api, action: str, name: str, reason: str = "test") -> activation_pb2.Activation:
    method = {"suspend": "SuspendActivation", "resume": "ResumeActivation", "revoke": "RevokeActivation"}[action]
    return getattr(api.advisor, method)(activation_pb2.TransitionActivationRequest(name=name, reason=reason))


def settle(h: Harness, name: str, until: dt.date | None = None) -> jobs.SettlementSummary:
    return jobs.run_settlement(h.ctx, until, activation_ids=[name.split("/")[1]])


def report_usage(api: Api, account: str, month: str, used: bool, caller: str = "platform-oc",
                 request_id: str = "") -> activation_pb2.ReportUsageResponse:
    return api.as_(caller).ReportUsage(activation_pb2.ReportUsageRequest(
        account_id=account, month=month, used=used, request_id=request_id))


def refuse_usage(api: Api, account: str, month: str, used: bool, code: grpc.StatusCode,
                 caller: str = "platform-oc", request_id: str = "") -> str:
    f = expect_error(api.as_(caller).ReportUsage, activation_pb2.ReportUsageRequest(
        account_id=account, month=month, used=used, request_id=request_id), code)
    return f.reason


def events_of(h: Harness, name: str) -> list[Event]:
    with h.ctx.db.read() as s:
        return list(s.execute(select(Event).where(Event.subject == name).order_by(Event.seq)).scalars())


def stored_state(h: Harness, name: str) -> str:
    with h.ctx.db.read() as s:
        return str(s.execute(select(Activation.state).where(Activation.id == name.split("/")[1])).scalar_one())


# ----------------------------------------------------------------------------- the pure rules

def test_access_months_are_named_by_the_month_they_begin_in() -> None:
    months = consumption.access_months(D(2026, 1, 31), 3, D(2026, 4, 29))  # rules.access_end(31 Jan, 3)
    assert [(m.label, m.first, m.last) for m in months] == [
        ("2026-01", D(2026, 1, 31), D(2026, 2, 27)), ("2026-02", D(2026, 2, 28), D(2026, 3, 30)),
        ("2026-03", D(2026, 3, 31), D(2026, 4, 29))]
    cut = consumption.access_months(D(2026, 3, 16), 12, D(2026, 5, 31))  # an end date cut early
    assert [m.label for m in cut] == ["2026-03", "2026-04", "2026-05"] and cut[-1].last == D(2026, 5, 31)


def test_access_is_on_the_days_of_suspension_resumption_and_revocation() -> None:
    T = consumption.Transition
    history = [T(D(2026, 4, 10), "suspend"), T(D(2026, 5, 20), "resume"), T(D(2026, 6, 1), "end")]
    assert consumption.on_periods(D(2026, 3, 16), history, D(2026, 12, 1)) == [
        (D(2026, 3, 16), D(2026, 4, 10)), (D(2026, 5, 20), D(2026, 6, 1))]
    # As of an earlier day, later transitions do not count yet.
    assert consumption.on_periods(D(2026, 3, 16), history, D(2026, 4, 30)) == [(D(2026, 3, 16), D(2026, 4, 10))]


@st.composite
def _shares_bp(draw: st.DrawFn) -> dict[str, int]:
    """1 to 5 funders with positive basis points summing to 10000, tiny shares included (what
    `entitlement programs check` accepts)."""
    n = draw(st.integers(1, 5))
    cuts = sorted(draw(st.lists(st.integers(1, 9999), min_size=n - 1, max_size=n - 1, unique=True)))
    return {f"f{i}": b - a for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, 10_000]))}


@settings(max_examples=500, deadline=None)
@given(price=st.integers(min_value=1, max_value=100_000), months=st.integers(min_value=1, max_value=120),
       funders=_shares_bp(), steps=st.lists(st.integers(min_value=1, max_value=5), max_size=12))
@example(price=1500, months=12, funders={"f0": 3, "f1": 9996, "f2": 1}, steps=[1, 1, 1, 1])
@example(price=1999, months=8, funders={"f0": 1, "f1": 5290, "f2": 4709}, steps=[1] * 7)
def test_closing_months_one_by_one_or_in_bulk_splits_each_to_the_cent(price: int, months: int,
                                                                       funders: dict[str, int],
                                                                       steps: list[int]) -> None:
    """Every booking whole months to the cent, no amount negative, no funder ever closing more than
    it committed, and everything closed in the end. (Closings split by the fixed shares, split(j x
    price) - split((j - 1) x price), broke the middle two with three funders or more: the examples,
    found by a review, booked -1 cent in the fourth month, and had a 1-cent funder consume 2.)"""
    terms = consumption.Terms("access", 31, price, months, funders)
    committed = split_cents(months * price, funders)
    closed: dict[str, int] = {}
    done = 0
    for step in [*steps, months]:  # consume or release `step` months at a time, then the rest
        target = min(done + step, months)
        if target == done:
            continue
        amounts = consumption.closing(terms, committed, closed, target)
        assert sum(amounts.values()) == (target - done) * price  # each booking is whole months, to the cent
        assert all(v >= 0 for v in amounts.values()), amounts
        for f, cents in amounts.items():
            closed[f] = closed.get(f, 0) + cents
            assert closed[f] <= committed[f], (f, closed, committed)
        done = target
    assert closed == committed  # every month closed: each funder's share of the commitment, exactly


def test_closing_an_even_split_books_what_the_shares_say() -> None:
    """Two funders at 50 / 50 and an even price: each month half and half, as before the change of
    rule (and an odd price alternates the odd cent)."""
    shares = {"france-travail": 5000, "ministry-of-labour": 5000}
    for price, months in ((2000, 12), (1999, 4)):
        terms = consumption.Terms("access", 31, price, months, shares)
        committed = split_cents(months * price, shares)
        closed: dict[str, int] = {}
        seen = []
        for j in range(1, months + 1):
            amounts = consumption.closing(terms, committed, closed, j)
            seen.append(tuple(amounts.values()))
            for f, cents in amounts.items():
                closed[f] = closed.get(f, 0) + cents
        if price == 2000:
            assert seen == [(1000, 1000)] * months
        else:
            assert sorted(seen) == sorted([(1000, 999), (999, 1000)] * 2)


# ------------------------------------------------------------------------------ months of access

def test_access_months_are_consumed_as_they_begin_then_expiry_settles(h: Harness, api: Api) -> None:
    act = activate(api)
    expect(h, act.name, consumed=[], released_months=0)  # committed, nothing owed before the job

    first = settle(h, act.name)
    assert (first.examined, first.months_consumed, first.consumed_cents, first.released_cents) == (1, 1, PRICE, 0)
    expect(h, act.name, consumed=["2026-03"], released_months=0)
    again = settle(h, act.name)  # idempotent
    assert (again.months_consumed, again.consumed_cents, again.released_cents, again.expired) == (0, 0, 0, 0)
    expect(h, act.name, consumed=["2026-03"], released_months=0)
    assert_report_matches_ledger(h, api)

    with on_day(h, D(2026, 5, 20)):  # the months beginning 16 April and 16 May have begun
        assert settle(h, act.name).months_consumed == 2
        expect(h, act.name, consumed=["2026-03", "2026-04", "2026-05"], released_months=0)
        assert_report_matches_ledger(h, api)

    with on_day(h, D(2027, 3, 15)):  # the last day of access: still live, every month has begun
        last = settle(h, act.name)
        assert (last.expired, last.months_consumed) == (0, 9)
        assert stored_state(h, act.name) == "active"

    with on_day(h, D(2027, 3, 16)):  # the day after the end date
        done = settle(h, act.name)
        assert (done.expired, done.months_consumed, done.released_cents) == (1, 0, 0)
        assert stored_state(h, act.name) == "expired"
        m = expect(h, act.name, consumed=[f"2026-{m:02d}" for m in range(3, 13)] + ["2027-01", "2027-02"],
                   released_months=0)
        assert m.committed == m.consumed  # every month begun was owed: nothing left
        [expired] = [e for e in events_of(h, act.name) if e.type == "activation.expired"]
        assert expired.actor == "system:settlement" and expired.reason == "end date passed"
        payload = json.loads(expired.payload_json)
        assert (payload["from"], payload["to"], payload["end_date"]) == ("active", "expired", "2027-03-15")
        assert payload["released_cents"] == each(0)
        nothing = settle(h, act.name)
        assert (nothing.examined, nothing.expired, nothing.consumed_cents, nothing.released_cents) == (0, 0, 0, 0)
        assert [e.type for e in events_of(h, act.name)].count("activation.expired") == 1
        assert_report_matches_ledger(h, api)


def test_settling_up_to_an_earlier_date_consumes_only_the_months_begun_by_then(h: Harness, api: Api) -> None:
    act = activate(api)
    with on_day(h, D(2026, 6, 20)):
        with pytest.raises(ValueError, match="future"):
            jobs.run_settlement(h.ctx, D(2026, 6, 21))
        assert settle(h, act.name, until=D(2026, 4, 16)).months_consumed == 2
        expect(h, act.name, consumed=["2026-03", "2026-04"], released_months=0)
        assert settle(h, act.name).months_consumed == 2  # then up to today
        expect(h, act.name, consumed=["2026-03", "2026-04", "2026-05", "2026-06"], released_months=0)
        assert settle(h, act.name, until=D(2026, 4, 1)).consumed_cents == 0  # an earlier date changes nothing
    assert_report_matches_ledger(h, api)


def test_revocation_consumes_the_months_begun_and_releases_the_rest(h: Harness, api: Api) -> None:
    act = activate(api)
    with on_day(h, D(2026, 4, 25)):  # second month of access begun, no job run yet
        move(api, "revoke", act.name, "found a job")
        expect(h, act.name, consumed=["2026-03", "2026-04"], released_months=10)
        [revoked] = [e for e in events_of(h, act.name) if e.type == "activation.revoked"]
        assert json.loads(revoked.payload_json)["released_cents"] == each(10 * HALF)
        # The release is booked in the month of the revocation; the consumption in the months owed.
        assert settle(h, act.name).examined == 0  # nothing reserved: the job skips it
    assert_report_matches_ledger(h, api)


def test_a_revocation_a_moment_before_midnight_is_settled_on_the_day_it_is_logged(h: Harness, api: Api) -> None:
    """The instant of a change and its civil day are read at once (Clock.moment): read one after
    the other (`now()`, then `today()`), a revocation at 23:59:59.999999 on 15 April was logged on the
    15th and settled as of the 16th, the first day of April's month of access: that month consumed,
    though by the log access had ended the day before it began. Here the clock's `today()` answers a
    microsecond after its `now()`, as the system clock does when read twice across midnight."""
    act = activate(api)  # 16 March: months of access begin on the 16th
    clock = h.clock
    before = clock.now()
    midnight = dt.datetime(2026, 4, 16, tzinfo=ZoneInfo(h.ctx.settings.timezone))
    clock.advance(midnight - dt.timedelta(microseconds=1) - before)
    clock.today = lambda: (clock.now() + dt.timedelta(microseconds=1)).astimezone(  # type: ignore[method-assign]
        ZoneInfo(h.ctx.settings.timezone)).date()
    try:
        move(api, "revoke", act.name, "found a job")
    finally:
        del clock.today
        clock.advance(before - clock.now())
    [revoked] = [e for e in events_of(h, act.name) if e.type == "activation.revoked"]
    logged_on = revoked.time.replace(tzinfo=revoked.time.tzinfo or dt.timezone.utc).astimezone(
        ZoneInfo(h.ctx.settings.timezone)).date()
    assert logged_on == D(2026, 4, 15)
    expect(h, act.name, consumed=["2026-03"], released_months=11)
    assert_report_matches_ledger(h, api)


# ------------------------------------------------------------------------------------ suspension

def test_a_month_suspended_from_its_first_day_to_its_last_is_not_owed(h: Harness, api: Api) -> None:
    act = activate(api)
    with on_day(h, D(2026, 4, 10)):
        move(api, "suspend", act.name, "hospital")
    with on_day(h, D(2026, 4, 20)):  # month 2 (16 April - 15 May) begun while suspended: not owed yet
        settle(h, act.name)
        expect(h, act.name, consumed=["2026-03"], released_months=0)
    with on_day(h, D(2026, 5, 20)):  # resumed in month 3: month 2 was off throughout
        move(api, "resume", act.name, "back")
        settle(h, act.name)
        expect(h, act.name, consumed=["2026-03", "2026-05"], released_months=1)
    with on_day(h, D(2026, 6, 20)):
        move(api, "revoke", act.name, "stopped")
        m = expect(h, act.name, consumed=["2026-03", "2026-05", "2026-06"], released_months=9)
        assert m.reserved == each(0)
    assert_report_matches_ledger(h, api)


def test_a_suspended_month_is_still_reserved_on_its_last_day(h: Harness, api: Api) -> None:
    """The settlement run on the last day of a month of access suspended so far releases nothing:
    a resumption that same day makes the month owed (the day of a resumption counts as on)."""
    act = activate(api)
    with on_day(h, D(2026, 4, 10)):
        move(api, "suspend", act.name, "hospital")
    with on_day(h, D(2026, 5, 15)):  # the last day of the month 16 April - 15 May, off so far
        settle(h, act.name)
        expect(h, act.name, consumed=["2026-03"], released_months=0)
        move(api, "resume", act.name, "back")
        settle(h, act.name)
        expect(h, act.name, consumed=["2026-03", "2026-04"], released_months=0)
    with on_day(h, D(2026, 5, 20)):
        settle(h, act.name)
        expect(h, act.name, consumed=["2026-03", "2026-04", "2026-05"], released_months=0)
    assert_report_matches_ledger(h, api)


def test_a_suspended_last_month_is_still_reserved_on_the_end_date(h: Harness, api: Api) -> None:
    """On its end date an activation is still live: the settlement that day keeps its last month,
    suspended so far, reserved, and a resumption that day makes it owed."""
    act = activate(api)
    with on_day(h, D(2027, 2, 10)):
        move(api, "suspend", act.name, "hospital")
    with on_day(h, D(2027, 3, 15)):  # the end date, last day of the month 16 February - 15 March
        settle(h, act.name)
        begun = [f"2026-{m:02d}" for m in range(3, 13)] + ["2027-01"]
        expect(h, act.name, consumed=begun, released_months=0)
        move(api, "resume", act.name, "back")
        settle(h, act.name)
        expect(h, act.name, consumed=[*begun, "2027-02"], released_months=0)
    assert_report_matches_ledger(h, api)


# (suspended on, resumed on or None, months consumed by 20 June, months released by then)
BOUNDARIES = [
    (D(2026, 4, 15), D(2026, 5, 16), ["2026-03", "2026-05", "2026-06"], 1),  # April's month off throughout
    (D(2026, 4, 16), D(2026, 5, 16), ["2026-03", "2026-04", "2026-05", "2026-06"], 0),  # on its first day
    (D(2026, 4, 15), D(2026, 5, 15), ["2026-03", "2026-04", "2026-05", "2026-06"], 0),  # on its last day
    (D(2026, 4, 10), None, ["2026-03"], 2),  # still suspended: April and May released, June reserved
]


@pytest.mark.parametrize("suspended,resumed,consumed,released", BOUNDARIES,
                         ids=["whole-month-off", "suspended-on-first-day", "resumed-on-last-day", "still-suspended"])
def test_a_day_of_access_makes_the_month_owed(h: Harness, api: Api, suspended: dt.date, resumed: dt.date | None,
                                              consumed: list[str], released: int) -> None:
    act = activate(api)
    with on_day(h, suspended):
        move(api, "suspend", act.name)
    if resumed:
        with on_day(h, resumed):
            move(api, "resume", act.name)
    with on_day(h, D(2026, 6, 20)):
        settle(h, act.name)
        expect(h, act.name, consumed=consumed, released_months=released)
    assert_report_matches_ledger(h, api)


# ------------------------------------------------------------------------------------ months of use

def test_use_program_owes_only_the_months_reported_used(h: Harness, api: Api) -> None:
    act, account = activate_and_redeem(api, OPENCFA)
    name = act.name
    settle(h, name)
    expect(h, name, consumed=[], released_months=0, program=OPENCFA)  # access alone owes nothing

    report_usage(api, account, "2026-03", True)
    expect(h, name, consumed=["2026-03"], released_months=0, program=OPENCFA)
    report_usage(api, account, "2026-03", True)  # the same report again: nothing changes
    expect(h, name, consumed=["2026-03"], released_months=0, program=OPENCFA)
    assert refuse_usage(api, account, "2026-03", False, grpc.StatusCode.FAILED_PRECONDITION) == "USAGE_ALREADY_CONSUMED"
    assert refuse_usage(api, account, "2026-04", True, grpc.StatusCode.FAILED_PRECONDITION) == "MONTH_NOT_BEGUN"
    assert refuse_usage(api, account, "2026-02", True, grpc.StatusCode.FAILED_PRECONDITION) == "MONTH_OUTSIDE_ACCESS"
    # 1-15 March 2027 is access, but of the month beginning 16 February 2027: not a month of its own.
    assert refuse_usage(api, account, "2027-03", True, grpc.StatusCode.FAILED_PRECONDITION) == "MONTH_OUTSIDE_ACCESS"
    assert_report_matches_ledger(h, api)

    with on_day(h, D(2026, 5, 20)):
        report_usage(api, account, "2026-04", False)  # not used: nothing booked, nothing released yet
        expect(h, name, consumed=["2026-03"], released_months=0, program=OPENCFA)
        report_usage(api, account, "2026-04", True)  # then used after all (not consumed yet: accepted)
        expect(h, name, consumed=["2026-03", "2026-04"], released_months=0, program=OPENCFA)

    with on_day(h, D(2026, 7, 16)):  # the last day to report May's month (16 May - 15 June, + 31 days)
        settle(h, name)
        expect(h, name, consumed=["2026-03", "2026-04"], released_months=0, program=OPENCFA)
    with on_day(h, D(2026, 7, 17)):  # its report window closed: the job releases it
        assert settle(h, name).released_cents == PRICE
        expect(h, name, consumed=["2026-03", "2026-04"], released_months=1, program=OPENCFA)
        f = expect_error(api.platform.ReportUsage, activation_pb2.ReportUsageRequest(
            account_id=account, month="2026-05", used=True), grpc.StatusCode.FAILED_PRECONDITION)
        assert f.reason == "REPORT_WINDOW_CLOSED" and f.metadata["deadline"] == "2026-07-16"

    with on_day(h, D(2026, 7, 20)):  # revoked in the month beginning 16 July
        move(api, "revoke", name, "left the apprenticeship")
        # June's and July's months may still be reported: they stay reserved; the 7 months not
        # begun are released.
        expect(h, name, consumed=["2026-03", "2026-04"], released_months=8, program=OPENCFA)
        report_usage(api, account, "2026-06", True)  # reported after the revocation, in its window
        expect(h, name, consumed=["2026-03", "2026-04", "2026-06"], released_months=8, program=OPENCFA)
    with on_day(h, D(2026, 8, 20)):  # access ended on 20 July: the month of 16 August never had any
        assert refuse_usage(api, account, "2026-08", True, grpc.StatusCode.FAILED_PRECONDITION) == "NO_ACCESS_IN_MONTH"
    with on_day(h, D(2026, 9, 16)):  # July's month (16 July - 15 August) window closed: released
        settle(h, name)
        m = expect(h, name, consumed=["2026-03", "2026-04", "2026-06"], released_months=9, program=OPENCFA)
        assert m.reserved == each(0, OPENCFA)
        assert settle(h, name).examined == 0  # fully settled: nothing left for the job
    assert_report_matches_ledger(h, api)


def test_use_reported_on_the_last_day_of_its_window_is_owed(h: Harness, api: Api) -> None:
    """`usage_report_days` after a month ends is the last day its use may be reported (inclusive):
    a report that day consumes the month."""
    act, account = activate_and_redeem(api, OPENCFA)
    with on_day(h, D(2026, 5, 16)):  # the month 16 March - 15 April, + 31 days
        report_usage(api, account, "2026-03", True)
        expect(h, act.name, consumed=["2026-03"], released_months=0, program=OPENCFA)
    assert_report_matches_ledger(h, api)


def test_a_usage_report_that_consumes_a_month_is_one_event(api: Api, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """ReportUsage consuming a month of a `use` program: one `ledger.consumed` event with the entries
    it booked, in their transaction; none for a repeat; no personal data; the funders of the
    program see it (and their export verifies), the others do not."""
    agency_id, birth = next_ledger_person()
    resp = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=f"programs/{OPENCFA}",
        platform="platforms/openclassrooms", reason="usage event", mentor_id="M-0042"))
    name, account = resp.activation.name, "learner-" + uuid.uuid4().hex[:12]
    api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=resp.activation_token, account_id=account))
    month = api.h.clock.today().strftime("%Y-%m")

    def consumed_events() -> list[Event]:
        with api.h.ctx.db.read() as s:
            return list(s.execute(select(Event).where(Event.subject == name, Event.type == "ledger.consumed")
                                  .order_by(Event.seq)).scalars())

    assert consumed_events() == []
    report = activation_pb2.ReportUsageRequest(account_id=account, month=month, used=True)
    api.platform.ReportUsage(report)
    [event] = consumed_events()
    assert (event.actor, event.program_id, event.platform_id) == (
        "platform:openclassrooms", OPENCFA, "openclassrooms")
    payload = json.loads(event.payload_json)
    with api.h.ctx.db.read() as s:
        entries = list(s.execute(select(LedgerEntry).where(
            LedgerEntry.activation_id == name.split("/")[1], LedgerEntry.kind == "consume")).scalars())
    assert payload == {"consumed_months": [month],
                       "consumed_cents": {e.funder_id: e.amount_cents for e in entries}}
    assert sorted(payload["consumed_cents"]) == ["opco-opcalia", "region-idf"] and all(
        e.month == month for e in entries)
    person_ref = api.h.ctx.pseudo.person_ref(api.h.ctx.pseudo.person_key(agency_id))
    for secret in (agency_id, birth.isoformat(), account, person_ref):
        assert secret not in event.payload_json + event.reason + event.actor
    api.platform.ReportUsage(report)  # the same report again: no booking, no event
    assert len(consumed_events()) == 1
    # Funders of the program see it; the others do not.
    for caller, sees in ((IDF, True), (MINISTRY, False)):
        listed = api.as_(caller).ListEvents(audit_pb2.ListEventsRequest(start_sequence=event.seq, page_size=1))
        assert (len(listed.events) == 1 and listed.events[0].sequence == event.seq) is sees
    # The log with it verifies, offline, from the program funder's export.
    bundle = export(capsys, api.h, IDF, tmp_path / "idf")
    exported = [json.loads(line) for line in (bundle / "events.jsonl").read_text().splitlines()]
    assert any(e.get("sequence", e.get("seq")) == event.seq and e.get("type") == "ledger.consumed"
               for e in exported), exported[-3:]
    code, output = verify(capsys, bundle, (bundle / "verifier-key.txt").read_text().strip())
    assert code == 0 and "OK:" in output, output


def test_use_program_month_suspended_throughout_cannot_be_reported_used(h: Harness, api: Api) -> None:
    act, account = activate_and_redeem(api, OPENCFA)
    with on_day(h, D(2026, 4, 1)):
        move(api, "suspend", act.name)
    with on_day(h, D(2026, 4, 20)):
        report_usage(api, account, "2026-03", True)  # March's month had access until 1 April
    with on_day(h, D(2026, 5, 20)):
        assert refuse_usage(api, account, "2026-04", True, grpc.StatusCode.FAILED_PRECONDITION) == "NO_ACCESS_IN_MONTH"
        settle(h, act.name)
        # April's month is over and never had access: released; May's (in progress, suspended) and
        # later months may still be owed.
        expect(h, act.name, consumed=["2026-03"], released_months=1, program=OPENCFA)
    assert_report_matches_ledger(h, api)


def test_reports_under_an_access_program_change_nothing(h: Harness, api: Api) -> None:
    act, account = activate_and_redeem(api, PREMIUM)
    settle(h, act.name)
    report_usage(api, account, "2026-03", False)  # owed because access was on, used or not
    report_usage(api, account, "2026-03", True)
    expect(h, act.name, consumed=["2026-03"], released_months=0)
    assert refuse_usage(api, account, "2026-05", True, grpc.StatusCode.FAILED_PRECONDITION) == "MONTH_NOT_BEGUN"


def test_report_usage_scope_and_validation(h: Harness, api: Api) -> None:
    act, account = activate_and_redeem(api, OPENCFA)
    missing = expect_error(api.platform.ReportUsage, activation_pb2.ReportUsageRequest(
        account_id="nobody-" + uuid.uuid4().hex[:8], month="2026-03", used=True), grpc.StatusCode.NOT_FOUND)
    other = expect_error(api.as_("platform-other").ReportUsage, activation_pb2.ReportUsageRequest(
        account_id=account, month="2026-03", used=True), grpc.StatusCode.NOT_FOUND)
    # Another platform's account answers exactly like an unknown one.
    assert missing.reason == other.reason == "ACCOUNT_NOT_FOUND"
    assert set(missing.metadata) == set(other.metadata)
    for month in ("2026-3", "2026-13", "march", ""):
        f = expect_error(api.platform.ReportUsage, activation_pb2.ReportUsageRequest(
            account_id=account, month=month, used=True), grpc.StatusCode.INVALID_ARGUMENT)
        assert "month" in f.fields
    f = expect_error(api.advisor.ReportUsage, activation_pb2.ReportUsageRequest(
        account_id=account, month="2026-03", used=True), grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "ROLE_NOT_ALLOWED"
    expect(h, act.name, consumed=[], released_months=0, program=OPENCFA)

    # AIP-155: a request_id replays; reused for another report, it is refused.
    request_id = uuid.uuid4().hex
    report_usage(api, account, "2026-03", True, request_id=request_id)
    report_usage(api, account, "2026-03", True, request_id=request_id)
    assert refuse_usage(api, account, "2026-03", False, grpc.StatusCode.FAILED_PRECONDITION,
                        request_id=request_id) == "REQUEST_ID_REUSED"
    expect(h, act.name, consumed=["2026-03"], released_months=0, program=OPENCFA)


def _two_programs_on_one_account(api: Api) -> tuple[str, str, str]:
    """One person's OpenCFA activation (16 March) and premium one (17 March, the more recent), both
    bound to the same platform account: (OpenCFA's name, premium's name, the account)."""
    agency_id, birth = next_ledger_person()
    account = "learner-" + uuid.uuid4().hex[:12]

    def bind(program: str) -> str:
        resp = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=f"programs/{program}",
            platform="platforms/openclassrooms", reason="two programs", mentor_id="M-0042" if program == OPENCFA else ""))
        api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=resp.activation_token, account_id=account))
        return resp.activation.name

    cfa = bind(OPENCFA)
    with on_day(api.h, D(2026, 3, 17)):
        premium = bind(PREMIUM)
    return cfa, premium, account


def test_usage_reports_go_to_the_use_program_when_one_account_holds_two(h: Harness, api: Api) -> None:
    """Without `program`, a report goes to the activation whose funders owe months of use (OpenCFA),
    not to the more recent premium one, where it would change nothing: the months reported used are
    consumed on OpenCFA and never released unbilled."""
    cfa, premium, account = _two_programs_on_one_account(api)
    with on_day(h, D(2026, 4, 20)):
        report_usage(api, account, "2026-03", True)
        report_usage(api, account, "2026-04", True)
        expect(h, cfa, consumed=["2026-03", "2026-04"], released_months=0, program=OPENCFA)
        expect(h, premium, consumed=[], released_months=0)  # premium's months are the job's to book
    with on_day(h, D(2026, 6, 20)):  # March's and April's report windows closed
        settle(h, cfa)
        expect(h, cfa, consumed=["2026-03", "2026-04"], released_months=0, program=OPENCFA)
    assert_report_matches_ledger(h, api)


def test_a_usage_report_may_name_its_program(h: Harness, api: Api) -> None:
    cfa, premium, account = _two_programs_on_one_account(api)

    def report(program: str, month: str = "2026-03", request_id: str = "") -> activation_pb2.ReportUsageRequest:
        return activation_pb2.ReportUsageRequest(account_id=account, month=month, used=True, program=program,
                                                 request_id=request_id)

    with on_day(h, D(2026, 4, 20)):
        api.platform.ReportUsage(report(f"programs/{PREMIUM}"))  # for premium: changes nothing
        expect(h, cfa, consumed=[], released_months=0, program=OPENCFA)
        expect(h, premium, consumed=[], released_months=0)
        request_id = uuid.uuid4().hex
        api.platform.ReportUsage(report(f"programs/{OPENCFA}", request_id=request_id))
        expect(h, cfa, consumed=["2026-03"], released_months=0, program=OPENCFA)
        api.platform.ReportUsage(report(f"programs/{OPENCFA}", request_id=request_id))  # a replay
        # The same request_id for another program is another report.
        f = expect_error(api.platform.ReportUsage, report(f"programs/{PREMIUM}", request_id=request_id),
                         grpc.StatusCode.FAILED_PRECONDITION)
        assert f.reason == "REQUEST_ID_REUSED"
        for bad in ("opencfa-apprentices", "programs/", "programs/Bad Name", "activations/x"):
            f = expect_error(api.platform.ReportUsage, report(bad), grpc.StatusCode.INVALID_ARGUMENT)
            assert "program" in f.fields, (bad, f)
        # No activation of that program on this account: the same answer as an unknown account.
        none = expect_error(api.platform.ReportUsage, report("programs/deuxieme-chance-numerique"),
                            grpc.StatusCode.NOT_FOUND)
        unknown = expect_error(api.platform.ReportUsage, activation_pb2.ReportUsageRequest(
            account_id="nobody-" + uuid.uuid4().hex[:8], month="2026-03", used=True,
            program="programs/deuxieme-chance-numerique"), grpc.StatusCode.NOT_FOUND)
        assert none.reason == unknown.reason == "ACCOUNT_NOT_FOUND"
        assert set(none.metadata) == set(unknown.metadata) and {"account_id", "program"} <= set(none.metadata)
        expect(h, cfa, consumed=["2026-03"], released_months=0, program=OPENCFA)
    assert_report_matches_ledger(h, api)



def test_a_usage_report_goes_to_the_activation_with_access_that_month_else_to_the_use_one(
        h: Harness, api: Api) -> None:
    """Without `program`: a month during which the OpenCFA activation was suspended throughout but
    the premium one (same account) was on is reported to premium, and accepted (it changes nothing
    there): the learner did have Premium that month. A month during which neither was on is judged
    on the OpenCFA one, whose funders owe months of use: NO_ACCESS_IN_MONTH, not accepted silently
    by premium."""
    cfa, premium, account = _two_programs_on_one_account(api)
    with on_day(h, D(2026, 4, 1)):
        move(api, "suspend", cfa)  # OpenCFA's month of 16 April: off throughout
    with on_day(h, D(2026, 5, 10)):
        move(api, "suspend", premium)  # premium's month of 17 May: off throughout (and OpenCFA's)
    with on_day(h, D(2026, 5, 20)):
        report_usage(api, account, "2026-04", True)  # premium was on in its month of 17 April
        expect(h, cfa, consumed=[], released_months=0, program=OPENCFA)
    with on_day(h, D(2026, 6, 20)):
        assert refuse_usage(api, account, "2026-05", True,
                            grpc.StatusCode.FAILED_PRECONDITION) == "NO_ACCESS_IN_MONTH"
        settle(h, cfa)
        expect(h, cfa, consumed=[], released_months=3, program=OPENCFA)  # none reported, three over
    assert_report_matches_ledger(h, api)


def test_a_usage_report_goes_to_the_most_recent_of_an_accounts_activations_of_a_program(
        h: Harness, api: Api) -> None:
    """An account whose OpenCFA activation was revoked and which holds a new one: a month both had
    access in (each its own month beginning in March) is consumed on the new one."""
    agency_id, birth = next_ledger_person()
    account = "learner-" + uuid.uuid4().hex[:12]

    def bind() -> str:
        resp = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=f"programs/{OPENCFA}",
            platform="platforms/openclassrooms", reason="again", mentor_id="M-0042"))
        api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=resp.activation_token, account_id=account))
        return resp.activation.name

    first = bind()  # 16 March: its month of 16 March
    with on_day(h, D(2026, 3, 20)):
        move(api, "revoke", first)
    with on_day(h, D(2026, 3, 25)):
        second = bind()  # its month of 25 March
    with on_day(h, D(2026, 3, 26)):
        report_usage(api, account, "2026-03", True)
        expect(h, second, consumed=["2026-03"], released_months=0, program=OPENCFA)
        expect(h, first, consumed=[], released_months=11, program=OPENCFA)
    assert_report_matches_ledger(h, api)


def lock_waiters(h: Harness) -> int:
    """PostgreSQL: the transactions of the test's database waiting for a lock now."""
    with h.ctx.db.read() as s:
        return int(s.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                  "AND datname = current_database()")).scalar_one())


@contextmanager
def log_head_held(h: Harness) -> Iterator[None]:
    """Hold the event log's head row (PostgreSQL) until the block ends: every write waits for it at
    its event, holding what it locked before (a settlement: the activation's row)."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with h.ctx.db.write() as s:
            s.execute(select(LogHead.size).where(LogHead.id == 1).with_for_update())
            holding.set()
            done.wait(20)

    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(hold)
        assert holding.wait(10)
        try:
            yield
        finally:
            done.set()
            holder.result()


def test_a_usage_report_waiting_on_the_settlement_at_midnight_judges_its_window_after_it(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The settlement job runs at midnight, beside the server. A report on the last day of a month's
    window that waited for the activation's row while the job, already on the next day, released
    that month (its window closed) was judged by the day it arrived: the month was consumed after
    its release, closed twice, and a later month used and reported in its window then found nothing
    reserved (REPORT_WINDOW_CLOSED): never billed (found by a review). A report is judged by the
    day once it holds the activation."""
    if backend[0] != "postgres":
        pytest.skip("orders the writers by PostgreSQL's row locks (SQLite's writers take one lock, in no set order)")
    with own_server(backend[0], tmp_path / "own", request) as server:
        api = Api(server)
        act, account = activate_and_redeem(api, OPENCFA)
        with on_day(server, D(2026, 4, 20)):  # revoked: March's and April's months may still be reported
            move(api, "revoke", act.name, "left the apprenticeship")
        expect(server, act.name, consumed=[], released_months=10, program=OPENCFA)
        with on_day(server, D(2026, 5, 17)), ThreadPoolExecutor(2) as pool:  # March's window closed on 16 May
            with log_head_held(server):
                job = pool.submit(settle, server, act.name)  # holds the activation's row, at its event
                wait_until(lambda: lock_waiters(server) == 1, "the job waiting for the log head")
                server.clock.advance(-dt.timedelta(days=1))  # a report of 16 May, a moment before midnight
                report = pool.submit(refuse_usage, api, account, "2026-03", True,
                                     grpc.StatusCode.FAILED_PRECONDITION)
                wait_until(lambda: lock_waiters(server) == 2, "the report waiting for the activation's row")
                server.clock.advance(dt.timedelta(days=1))  # midnight has passed
            assert job.result().released_cents == PRICE
            assert report.result() == "REPORT_WINDOW_CLOSED"
        expect(server, act.name, consumed=[], released_months=11, program=OPENCFA)
        with on_day(server, D(2026, 5, 20)):  # April's month (16 April - 15 May) in its window
            report_usage(api, account, "2026-04", True)
        m = expect(server, act.name, consumed=["2026-04"], released_months=11, program=OPENCFA)
        assert m.reserved == each(0, OPENCFA)
        assert_report_matches_ledger(server, api)


def test_a_suspension_waiting_on_the_settlement_at_midnight_is_made_on_the_day_it_holds_the_row(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A suspension sent a moment before midnight that waited for the activation's row while the
    settlement job, already on the next day, consumed the month of access beginning that day, was
    logged on the day it arrived: by the log, that month was then suspended from its first day to its
    last, never owed, and the funders paid for it (found by a review). A change is made, and logged,
    as of the moment it holds the activation: the month consumed had its day of access."""
    if backend[0] != "postgres":
        pytest.skip("orders the writers by PostgreSQL's row locks (SQLite's writers take one lock, in no set order)")
    with own_server(backend[0], tmp_path / "own", request) as server:
        api = Api(server)
        act = activate(api)
        with on_day(server, D(2026, 4, 16)), ThreadPoolExecutor(2) as pool:  # April's month begins today
            with log_head_held(server):
                job = pool.submit(settle, server, act.name)  # holds the activation's row, at its event
                wait_until(lambda: lock_waiters(server) == 1, "the job waiting for the log head")
                server.clock.advance(-dt.timedelta(days=1))  # 15 April, a moment before midnight
                suspend = pool.submit(move, api, "suspend", act.name, "hospital")
                wait_until(lambda: lock_waiters(server) == 2, "the suspension waiting for the activation's row")
                server.clock.advance(dt.timedelta(days=1))  # midnight has passed
            assert job.result().months_consumed == 2
            suspend.result()
        with on_day(server, D(2026, 5, 20)):
            move(api, "resume", act.name, "back")
            settle(server, act.name)
        m = money(server, act.name)
        # Every month consumed had a day of access by the log's own account of the suspension.
        tz = server.ctx.settings.timezone
        with server.ctx.db.read() as s:
            a = s.get(Activation, act.name.split("/")[1])
            assert a is not None
            periods = consumption.on_periods(a.start_date, ledger.history(s, a, tz), D(2026, 5, 20))
        months = consumption.access_months(D(2026, 3, 16), MONTHS, D(2027, 3, 15))
        assert [label for label in m.consumed_months
                if not consumption.accessible(consumption.month_of(label, months), periods)] == [], periods
        assert_report_matches_ledger(server, api)


def test_a_settlement_run_past_midnight_releases_nothing_a_revocation_of_the_new_day_keeps_reportable(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A settlement run begun before midnight settled every activation as of the day it began. An
    OpenCFA activation revoked after midnight, on the first day of a month of access (a day of
    access: that month may be reported used), was then settled as of the day before, when that
    month had not begun: released. Reported used, it was consumed after its release, closed twice,
    and an earlier month used and reported within its window then found nothing reserved
    (REPORT_WINDOW_CLOSED): never billed (found by a review). Each activation is settled as of the
    day the job holds it."""
    if backend[0] != "postgres":
        pytest.skip("orders the writers by PostgreSQL's row locks (SQLite's writers take one lock, in no set order)")
    with own_server(backend[0], tmp_path / "own", request) as server:
        api = Api(server)
        accounts = {act.name: account for act, account in (activate_and_redeem(api, OPENCFA) for _ in range(2))}
        first, later = sorted(accounts)  # the job's order
        first_id, account = first.split("/")[1], accounts[later]
        with on_day(server, D(2026, 4, 15)), ThreadPoolExecutor(2) as pool:
            holding, done = threading.Event(), threading.Event()

            def hold_the_first() -> None:  # the job waits for it, its day already read
                with server.ctx.db.write() as s:
                    s.execute(select(Activation.id).where(Activation.id == first_id).with_for_update())
                    holding.set()
                    done.wait(20)

            holder = pool.submit(hold_the_first)
            assert holding.wait(10)
            job = pool.submit(jobs.run_settlement, server.ctx, None,
                              activation_ids=[first_id, later.split("/")[1]])
            wait_until(lambda: lock_waiters(server) == 1, "the job waiting for the first activation")
            server.clock.advance(dt.timedelta(days=1))  # midnight: 16 April, April's month begins
            move(api, "revoke", later, "left the apprenticeship")  # March's and April's months reportable
            expect(server, later, consumed=[], released_months=10, program=OPENCFA)
            done.set()
            holder.result()
            job.result()
            server.clock.advance(-dt.timedelta(days=1))
        expect(server, later, consumed=[], released_months=10, program=OPENCFA)
        with on_day(server, D(2026, 4, 20)):  # both used, reported within their windows
            report_usage(api, account, "2026-04", True)
            report_usage(api, account, "2026-03", True)
        m = expect(server, later, consumed=["2026-03", "2026-04"], released_months=10, program=OPENCFA)
        assert m.reserved == each(0, OPENCFA)
        assert_report_matches_ledger(server, api)


# ------------------------------------------------------------------------------------------ jobs

def test_the_settlement_job_over_every_activation_is_idempotent(h: Harness, api: Api) -> None:
    activate(api)
    activate(api, OPENCFA)
    with on_day(h, D(2026, 12, 1)):
        first = jobs.run_settlement(h.ctx)
        assert first.examined >= 2
        second = jobs.run_settlement(h.ctx)
        assert (second.expired, second.months_consumed, second.consumed_cents, second.released_cents) == (0, 0, 0, 0)
        assert_report_matches_ledger(h, api)
    with h.ctx.db.read() as s:
        names = [f"activations/{i}" for i in s.execute(select(Activation.id)).scalars()]
    for name in names:
        money(h, name)  # each activation balances, reserved >= 0 per funder


def test_the_jobs_let_other_writers_of_sqlite_in_between_their_transactions(
        h: Harness, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each activation is settled (and revalidated) in its own short transaction, but on SQLite the
    next began some 0.1 ms after the COMMIT, and a writer of another process, sleeping in SQLite's
    busy handler, found the lock taken at nearly every try: beside a settlement of 3,000 activations
    (200,000 in the database) a write waited 2.3 s, the whole run. The jobs pause after holding the
    lock HOLD_S (jobs._Turns): a writer polling the file (here after every transaction) gets in
    and sees the bookings part-done. On both backends: each activation booked once, the doctor
    clean."""
    from entitlement import doctor
    monkeypatch.setattr(jobs, "HOLD_S", 0.0)
    monkeypatch.setattr(jobs, "PAUSE_S", 0.02)
    names = [activate(api).name for _ in range(30)]
    ids = [n.split("/")[1] for n in names]
    consumed = ("SELECT count(*) FROM events WHERE type = 'ledger.consumed' AND subject IN ("
                + ", ".join(f"'{n}'" for n in names) + ")")
    with on_day(h, D(2026, 5, 20)):
        with sqlite_writer_sees(h.url, consumed) as seen:
            summary = jobs.run_settlement(h.ctx, activation_ids=ids)
        assert summary.examined == 30 and summary.months_consumed == 3 * 30
        assert jobs.run_settlement(h.ctx, activation_ids=ids).months_consumed == 0  # nothing twice
        for name in names:
            expect(h, name, consumed=["2026-03", "2026-04", "2026-05"], released_months=0)
    assert doctor.check(h.ctx.db) == []
    if h.backend == "sqlite":
        part_done = {n for n in seen if 0 < n < 30}
        assert len(part_done) >= 10, f"the settlement left no room between its transactions (counts seen: {sorted(set(seen))})"


def test_jobs_from_the_command_line(backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from entitlement import cli
    with own_server(backend[0], tmp_path / "own", request) as server:
        act = activate(Api(server))
        monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", server.url)
        monkeypatch.setenv("ENTITLEMENT_PROGRAMS_DIR", str(server.ctx.settings.programs_dir))
        capsys.readouterr()
        assert cli.main(["jobs", "run", "--until", "2026-03-20"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("settled up to 2026-03-20: 1 activations examined, 0 expired, 1 months consumed (2000 cents)")
        expect(server, act.name, consumed=["2026-03"], released_months=0)
        assert cli.main(["jobs", "run", "--until", "2026-03-20"]) == 0  # idempotent
        assert "0 months consumed (0 cents), 0 cents released" in capsys.readouterr().out
        assert cli.main(["jobs", "run", "--until", "2999-01-01"]) == 1
        assert "in the future" in capsys.readouterr().err
        assert cli.main(["jobs", "run", "--until", "20-03-2026"]) == 1
        assert "--until" in capsys.readouterr().err
        assert cli.main(["jobs", "revalidate"]) == 0
        assert capsys.readouterr().out.startswith("revalidated against registry snapshot ")
        assert cli.main(["jobs", "daily"]) == 0  # revalidation, then settlement up to today
        lines = capsys.readouterr().out.splitlines()
        assert [x.split(" ", 1)[0] for x in lines] == ["revalidated", "settled"], lines
        assert lines[1].startswith(f"settled up to {SystemClock().today().isoformat()}: 1 activations examined")


# ------------------------------------------------------------------------------------ revalidation

def test_activating_again_after_an_end_date_the_job_has_not_yet_settled(backend: tuple[str, str], tmp_path: Path,
                                                                       request: pytest.FixtureRequest) -> None:
    """A person whose activation passed its end date before the settlement job ran is activated
    again: the old one is expired and settled in the same transaction (consumed, released, its
    event), the new one is live, and the books and the report still balance."""
    people = default_people()
    with own_server(backend[0], tmp_path / "own", request, people=people) as server:
        api = Api(server)
        agency_id, birth = next_ledger_person()
        request_for = activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=f"programs/{PREMIUM}",
            platform="platforms/openclassrooms", reason="first")
        first = api.advisor.ActivateEntitlement(request_for).activation
        assert first.end_date.year == 2027 and first.end_date.month == 3 and first.end_date.day == 15
        extract = write_registry(tmp_path / "later.csv", people)
        with on_day(server, D(2027, 3, 15)):  # the end date, last day of access: still the live one
            registry.import_extract(server.ctx.db, server.ctx.pseudo, server.clock, extract,
                                    extracted_on=D(2027, 3, 14))
            f = expect_error(api.advisor.ActivateEntitlement, request_for, grpc.StatusCode.ALREADY_EXISTS)
            assert f.reason == "ACTIVATION_EXISTS" and f.metadata["activation"] == first.name
            assert stored_state(server, first.name) == "active"
        with on_day(server, D(2027, 3, 20)):  # past the end date; no settlement job has run
            registry.import_extract(server.ctx.db, server.ctx.pseudo, server.clock, extract,
                                    extracted_on=D(2027, 3, 19))
            assert stored_state(server, first.name) == "active"
            second = api.advisor.ActivateEntitlement(request_for).activation
            assert second.name != first.name and second.state == activation_pb2.ACTIVE
            assert stored_state(server, first.name) == "expired"
            assert [e.type for e in events_of(server, first.name)].count("activation.expired") == 1
            old = money(server, first.name)
            assert old.reserved == {f: 0 for f in FUNDERS[PREMIUM]}  # every month settled
            assert_report_matches_ledger(server, api)


def test_a_renewal_that_waited_for_the_expiry_at_midnight_starts_on_the_new_day(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A renewal sent a moment before midnight of the old activation's end date waits for the old
    row, which the settlement job, already on the next day, holds to expire it. The renewal took
    its day when it arrived: once the old row was expired it started on that last day, so that day
    was in the old activation's last month of access and in the new one's first, and the funders
    paid both months for it (found by a review). An activation takes its day once it holds the
    person's rows in the program: it starts the day after the old one ended."""
    if backend[0] != "postgres":
        pytest.skip("orders the writers by PostgreSQL's row locks (SQLite's writers take one lock, in no set order)")
    people = default_people()
    with own_server(backend[0], tmp_path / "own", request, people=people) as server:
        api = Api(server)
        agency_id, birth = next_ledger_person()
        request_for = activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=f"programs/{PREMIUM}",
            platform="platforms/openclassrooms", reason="renewal")
        first = api.advisor.ActivateEntitlement(request_for).activation
        end = D(first.end_date.year, first.end_date.month, first.end_date.day)
        with on_day(server, end + dt.timedelta(days=1)), ThreadPoolExecutor(2) as pool:
            registry.import_extract(server.ctx.db, server.ctx.pseudo, server.clock,
                                    write_registry(tmp_path / "later.csv", people), extracted_on=end)
            with log_head_held(server):
                job = pool.submit(settle, server, first.name)  # expires the old one; holds its row at its event
                wait_until(lambda: lock_waiters(server) == 1, "the job waiting for the log head")
                server.clock.advance(-dt.timedelta(days=1))  # the old one's last day, a moment before midnight
                renewal = pool.submit(api.advisor.ActivateEntitlement, request_for)
                wait_until(lambda: lock_waiters(server) == 2, "the renewal waiting for the old activation's row")
                server.clock.advance(dt.timedelta(days=1))  # midnight has passed
            assert job.result().expired == 1
            second = renewal.result().activation
            assert D(second.start_date.year, second.start_date.month, second.start_date.day) == end + dt.timedelta(days=1)
            settle(server, second.name)
            assert_report_matches_ledger(server, api)


def test_revalidation_curtails_or_expires_those_no_longer_eligible(backend: tuple[str, str], tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    people = default_people()
    with own_server(backend[0], tmp_path / "own", request, people=people) as server:
        api = Api(server)
        ids = {}
        for who in ("stays", "ended-april", "ended-march", "category-6", "gone"):
            agency_id, birth = next_ledger_person()
            ids[who] = (agency_id, api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                job_seeker=identity(agency_id, birth), program=f"programs/{PREMIUM}",
                platform="platforms/openclassrooms", reason="revalidation test")).activation.name)
        # A later extract: two registrations ended, one person now in category 6, one gone.
        later = dict(people)
        birth, postal, reg, _end, _cat = later[ids["ended-april"][0]]
        later[ids["ended-april"][0]] = (birth, postal, reg, "2026-04-10", "1")
        birth, postal, reg, _end, _cat = later[ids["ended-march"][0]]
        later[ids["ended-march"][0]] = (birth, postal, reg, "2026-03-20", "1")
        birth, postal, reg, _end, _cat = later[ids["category-6"][0]]
        later[ids["category-6"][0]] = (birth, postal, reg, "", "6")
        del later[ids["gone"][0]]
        extract = write_registry(tmp_path / "later.csv", later)
        with on_day(server, D(2026, 5, 10)):
            registry.import_extract(server.ctx.db, server.ctx.pseudo, server.clock, extract,
                                    extracted_on=D(2026, 5, 5))
            r = jobs.run_revalidation(server.ctx)
            assert (r.examined, r.still_eligible, r.curtailed, r.expired) == (5, 1, 3, 1)
            again = jobs.run_revalidation(server.ctx)  # idempotent
            assert (again.curtailed, again.expired, again.released_cents) == (0, 0, 0)
            # The three curtailed (the expired one is no longer live) are not "still eligible": they
            # were said to be, run after run, while the snapshot stayed the current one.
            assert (again.examined, again.still_eligible, again.already_ending) == (4, 1, 3), again

            def end_of(who: str) -> tuple[str, dt.date]:
                with server.ctx.db.read() as s:
                    a = s.execute(select(Activation).where(Activation.id == ids[who][1].split("/")[1])).scalar_one()
                    return a.state, a.end_date

            assert end_of("stays") == ("active", D(2027, 3, 15))
            # Registration ended 10 April: access to the end of the month after (program parameter).
            assert end_of("ended-april") == ("active", D(2026, 5, 31))
            # 3 months of access reachable: the 2 begun are consumed, May's stays reserved.
            expect(server, ids["ended-april"][1], consumed=["2026-03", "2026-04"], released_months=9)
            # Ended 20 March: the end of April is past: expired at once; the months begun are owed.
            assert end_of("ended-march") == ("expired", D(2026, 4, 30))
            expect(server, ids["ended-march"][1], consumed=["2026-03", "2026-04"], released_months=10)
            # Category 6, or gone from the registry: from the extract's date (5 May), end of June.
            assert end_of("category-6") == ("active", D(2026, 6, 30))
            assert end_of("gone") == ("active", D(2026, 6, 30))
            expect(server, ids["gone"][1], consumed=["2026-03", "2026-04"], released_months=8)

            curtailed = {who: [e for e in events_of(server, name) if e.type == "activation.curtailed"]
                         for who, (_a, name) in ids.items()}
            assert curtailed["stays"] == []
            for who in ("ended-april", "ended-march", "category-6", "gone"):
                [event] = curtailed[who]
                assert event.actor == "system:revalidation"
                payload = json.loads(event.payload_json)
                assert payload["previous_end_date"] == "2027-03-15"
                assert payload["failed_criteria"] == {
                    "ended-april": ["REGISTRATION_ENDED"], "ended-march": ["REGISTRATION_ENDED"],
                    "category-6": ["CATEGORY_NOT_COVERED"], "gone": ["NOT_REGISTERED"]}[who]
                assert payload["failed_criteria"][0] in event.reason
            assert json.loads(curtailed["ended-march"][0].payload_json)["to"] == "expired"
            status = api.advisor.GetActivation(activation_pb2.GetActivationRequest(name=ids["ended-march"][1]))
            assert status.state == activation_pb2.EXPIRED
            # Expired at once: a state change, whose reason is the curtailment's (the others are live:
            # no state change, the activation's reason stays).
            assert status.state_reason == curtailed["ended-march"][0].reason
            live = api.advisor.GetActivation(activation_pb2.GetActivationRequest(name=ids["gone"][1]))
            assert (live.state, live.state_reason) == (activation_pb2.ACTIVE, "revalidation test")
            assert_report_matches_ledger(server, api)

        with on_day(server, D(2026, 6, 1)):  # the settlement job then expires the curtailed one at its new end
            done = jobs.run_settlement(server.ctx)
            assert done.expired == 1
            expect(server, ids["ended-april"][1], consumed=["2026-03", "2026-04", "2026-05"], released_months=9)
            assert_report_matches_ledger(server, api)


def programs_covering_fewer_categories_from(root: Path, day: dt.date) -> Path:
    """The repository's programs, premium's categories narrowed to 1-3 from `day` (a dated value)."""
    progs = root / "programs"
    shutil.copytree(ROOT / "programs", progs)
    path = progs / f"{PREMIUM}.yaml"
    text = path.read_text(encoding="utf-8")
    old = ('        value: [1, 2, 3, 4, 5]\n'
           '        reference: "Categories 1-5 are job seekers (statistical A-E); 6-8 are out of scope (DOMAIN.md)"\n')
    assert old in text
    path.write_text(text.replace(old, old + (f'      {day.isoformat()}:\n'
                                             '        value: [1, 2, 3]\n'
                                             '        reference: "test: categories 4 and 5 no longer covered"\n')),
                    encoding="utf-8")
    return progs


def test_revalidation_judges_a_holder_by_the_program_parameters_of_the_start_date(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Premium covers categories 1-5, then 1-3 from 1 April 2026 (a dated value). A category-4 job
    seeker activated on 16 March keeps the access granted: the next extract (5 May, same facts)
    does not curtail them for a rule that took effect after their start (it did, to the end of June,
    'no longer eligible (CATEGORY_NOT_COVERED) in registry snapshot ...', the day depending on when
    that extract came). New activations follow the new value; a holder whose own facts changed (now
    category 6) is curtailed as before."""
    people = default_people()
    kept, changed, newcomer = "CATFOUR01", "CATFOUR02", "CATFOUR03"
    for ident in (kept, changed, newcomer):
        people[ident] = ("1990-06-15", "75011", "2024-01-15", "", "4")
    progs = programs_covering_fewer_categories_from(tmp_path, D(2026, 4, 1))
    with own_server(backend[0], tmp_path / "own", request, people=people, programs_dir=progs) as server:
        api = Api(server)
        names = {who: api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(who, D(1990, 6, 15)), program=f"programs/{PREMIUM}",
            platform="platforms/openclassrooms", reason="category 4")).activation.name for who in (kept, changed)}
        later = dict(people)
        later[changed] = ("1990-06-15", "75011", "2024-01-15", "", "6")
        extract = write_registry(tmp_path / "later.csv", later)
        with on_day(server, D(2026, 5, 10)):
            registry.import_extract(server.ctx.db, server.ctx.pseudo, server.clock, extract,
                                    extracted_on=D(2026, 5, 5))
            r = jobs.run_revalidation(server.ctx, activation_ids=[n.split("/")[1] for n in names.values()])
            assert (r.examined, r.still_eligible, r.curtailed, r.expired) == (2, 1, 1, 0), r
            got = {who: api.advisor.GetActivation(activation_pb2.GetActivationRequest(name=name))
                   for who, name in names.items()}
            assert (got[kept].state, D(got[kept].end_date.year, got[kept].end_date.month, got[kept].end_date.day)) == (
                activation_pb2.ACTIVE, D(2027, 3, 15))
            assert [e for e in events_of(server, names[kept]) if e.type == "activation.curtailed"] == []
            assert D(got[changed].end_date.year, got[changed].end_date.month, got[changed].end_date.day) == D(2026, 6, 30)
            f = expect_error(api.advisor.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
                job_seeker=identity(newcomer, D(1990, 6, 15)), program=f"programs/{PREMIUM}",
                platform="platforms/openclassrooms", reason="category 4"), grpc.StatusCode.FAILED_PRECONDITION)
            assert f.reason == "NOT_ELIGIBLE" and "CATEGORY_NOT_COVERED" in f.message
            assert_report_matches_ledger(server, api)


@contextmanager
def activation_held(h: Harness, activation_id: str) -> Iterator[None]:
    """Hold the activation's row until the block ends: PostgreSQL, its row lock; SQLite, the write
    lock (every writer waits for it). Yields once it is held."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with h.ctx.db.write() as s:
            s.execute(select(Activation.id).where(Activation.id == activation_id).with_for_update())
            holding.set()
            done.wait(20)

    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(hold)
        assert holding.wait(10)
        try:
            yield
        finally:
            done.set()
            holder.result()


def writers_waiting(h: Harness) -> int:
    """The writers waiting for a lock now: PostgreSQL, the database's; SQLite, this process's queue."""
    queue = h.ctx.db._writers
    return lock_waiters(h) if queue is None else queue.waiting


def test_a_revalidation_run_past_midnight_expires_an_activation_curtailed_to_the_day_before(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A revalidation run begun on 31 May judged every activation as of that day. One it reached
    after midnight, curtailed to 31 May (registration ended in April: access to the end of the
    month after), was logged `to: active` and left active, counted curtailed, when its access had
    in fact already ended: its curtailment is its last state change, the settlement's expiry then
    gave "end date passed" (found by a review). Each activation is judged as of the day the job
    holds it: expired at once."""
    people = default_people()
    with own_server(backend[0], tmp_path / "own", request, people=people) as server:
        api = Api(server)
        agency_id, birth = next_ledger_person()
        act = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=f"programs/{PREMIUM}", platform="platforms/openclassrooms",
            reason="revalidation test")).activation
        later = dict(people)
        b, postal, reg, _end, cat = later[agency_id]
        later[agency_id] = (b, postal, reg, "2026-04-10", cat)  # access to 31 May
        activation_id = act.name.split("/")[1]
        with on_day(server, D(2026, 5, 31)), ThreadPoolExecutor(1) as pool:
            registry.import_extract(server.ctx.db, server.ctx.pseudo, server.clock,
                                    write_registry(tmp_path / "later.csv", later), extracted_on=D(2026, 5, 30))
            with activation_held(server, activation_id):
                job = pool.submit(jobs.run_revalidation, server.ctx, activation_ids=[activation_id])
                wait_until(lambda: writers_waiting(server) == 1, "the job waiting for the activation")
                server.clock.advance(dt.timedelta(days=1))  # midnight: 1 June, access ended yesterday
            r = job.result()
            server.clock.advance(-dt.timedelta(days=1))
        assert (r.curtailed, r.expired) == (0, 1)
        [event] = [e for e in events_of(server, act.name) if e.type == "activation.curtailed"]
        payload = json.loads(event.payload_json)
        assert (payload["to"], payload["end_date"]) == ("expired", "2026-05-31")
        with server.ctx.db.read() as s:
            a = s.get(Activation, activation_id)
            assert a is not None
            assert (a.state, a.end_date, a.state_reason) == ("expired", D(2026, 5, 31), event.reason)
        expect(server, act.name, consumed=["2026-03", "2026-04", "2026-05"], released_months=9)
        assert_report_matches_ledger(server, api)


def test_an_expired_activation_gives_its_expiry_as_the_reason_of_its_last_state_change(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """activation.proto: `state_reason` is the reason given for the last state change. An activation
    suspended ("hospital stay") whose end date then passed answered EXPIRED with the suspension's
    reason, in GetActivation and in a funder's ListActivations, before the settlement job recorded
    the expiry and after (its event says "end date passed"): an advisor read `expired (hospital
    stay)` (found by a review). The expiry's reason is given, as the job records it."""
    with own_server(backend[0], tmp_path / "own", request) as server:
        api = Api(server)
        act = activate(api)
        move(api, "suspend", act.name, "hospital stay")
        end = D(act.end_date.year, act.end_date.month, act.end_date.day)

        def answers() -> set[tuple[int, str]]:
            got = api.advisor.GetActivation(activation_pb2.GetActivationRequest(name=act.name))
            [listed] = api.as_("funder-ft").ListActivations(audit_pb2.ListActivationsRequest()).activations
            return {(got.state, got.state_reason), (listed.state, listed.state_reason)}

        assert answers() == {(activation_pb2.SUSPENDED, "hospital stay")}
        with on_day(server, end + dt.timedelta(days=1)):
            assert answers() == {(activation_pb2.EXPIRED, "end date passed")}  # before the job
            assert settle(server, act.name).expired == 1
            assert answers() == {(activation_pb2.EXPIRED, "end date passed")}
            [expired] = [e for e in events_of(server, act.name) if e.type == "activation.expired"]
            assert expired.reason == "end date passed"


def test_revalidation_judges_the_age_limit_on_the_start_date(backend: tuple[str, str], tmp_path: Path,
                                                              request: pytest.FixtureRequest) -> None:
    """An apprentice activated at 25 who turns 26 during the access keeps it: revalidation judges
    an age limit on the activation's start, as the activation did (rules.revalidate)."""
    people = default_people()
    young, birth = "YOUNG0001", D(2000, 4, 1)  # 26 on 1 April 2026, a fortnight after the activation
    people[young] = (birth.isoformat(), "75011", "2024-01-15", "", "1")
    with own_server(backend[0], tmp_path / "own", request, people=people) as server:
        api = Api(server)
        act = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(young, birth), program=f"programs/{OPENCFA}", platform="platforms/openclassrooms",
            reason="apprenticeship", mentor_id="M-0042")).activation
        assert act.state == activation_pb2.ACTIVE
        with on_day(server, D(2026, 5, 10)):  # a later extract, the same facts: now 26
            extract = write_registry(tmp_path / "later.csv", people)
            registry.import_extract(server.ctx.db, server.ctx.pseudo, server.clock, extract,
                                    extracted_on=D(2026, 5, 5))
            r = jobs.run_revalidation(server.ctx)
            assert (r.examined, r.still_eligible, r.curtailed, r.expired) == (1, 1, 0, 0)
            now = api.advisor.GetActivation(activation_pb2.GetActivationRequest(name=act.name))
            assert now.state == activation_pb2.ACTIVE and now.end_date == act.end_date
            assert [e for e in events_of(server, act.name) if e.type == "activation.curtailed"] == []


def test_a_registration_found_ended_before_the_start_curtails_access_to_the_start_day(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A later extract says the registration ended two months before the activation: access ends
    on its start day (never before it: rules.revalidate), the month of access begun that day is
    owed and the rest released; the end date is never before the start date."""
    people = default_people()
    with own_server(backend[0], tmp_path / "own", request, people=people) as server:
        api = Api(server)
        agency_id, birth = next_ledger_person()
        act = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=f"programs/{PREMIUM}", platform="platforms/openclassrooms",
            reason="revalidation test")).activation
        later = dict(people)
        b, postal, reg, _end, cat = later[agency_id]
        later[agency_id] = (b, postal, reg, "2026-01-10", cat)  # end of February, the month after, is past
        with on_day(server, D(2026, 5, 10)):
            registry.import_extract(server.ctx.db, server.ctx.pseudo, server.clock,
                                    write_registry(tmp_path / "later.csv", later), extracted_on=D(2026, 5, 5))
            r = jobs.run_revalidation(server.ctx)
            assert (r.examined, r.curtailed, r.expired) == (1, 0, 1)  # expired at once
            now = api.advisor.GetActivation(activation_pb2.GetActivationRequest(name=act.name))
            assert now.state == activation_pb2.EXPIRED
            assert now.end_date == act.start_date
            expect(server, act.name, consumed=["2026-03"], released_months=11)
            assert_report_matches_ledger(server, api)


def test_expiry_and_curtailment_events_say_the_cents_they_consumed(backend: tuple[str, str], tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    """audit.proto: the events of revocations, expiries and curtailments give the cents they consumed
    or released per funder, so that a funder accounts for every move of its report from the log. An
    expiry, or a curtailment, consuming the months begun since the last settlement named the months
    but not the cents each funder owes for them (found by a review)."""
    people = default_people()
    with own_server(backend[0], tmp_path / "own", request, people=people) as server:
        api = Api(server)
        expiring = activate(api)
        agency_id, birth = next_ledger_person()
        curtailed = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=f"programs/{PREMIUM}",
            platform="platforms/openclassrooms", reason="ledger test")).activation
        later = dict(people)
        born, postal, registered, _end, category = later[agency_id]
        later[agency_id] = (born, postal, registered, "2026-03-20", category)
        with on_day(server, D(2026, 5, 10)):  # no settlement since the start: two months begun
            registry.import_extract(server.ctx.db, server.ctx.pseudo, server.clock,
                                    write_registry(tmp_path / "later.csv", later), extracted_on=D(2026, 5, 5))
            assert jobs.run_revalidation(server.ctx, activation_ids=[curtailed.name.split("/")[1]]).expired == 1
        with on_day(server, D(2027, 3, 16)):  # the day after the end date, never settled before
            assert jobs.run_settlement(server.ctx, activation_ids=[expiring.name.split("/")[1]]).expired == 1
        for name, kind, months in ((curtailed.name, "activation.curtailed", 2),
                                   (expiring.name, "activation.expired", 12)):
            [event] = [e for e in events_of(server, name) if e.type == kind]
            payload = json.loads(event.payload_json)
            assert len(payload["consumed_months"]) == months
            m = money(server, name)
            assert m.consumed == each(months * HALF)
            assert payload.get("consumed_cents") == m.consumed, (kind, payload)


# ------------------------------------------------------------------- three funders, uneven shares

def _program_with(dir_: Path, pid: str, funders: dict[str, int], price: int, months: int) -> None:
    """premium-job-seekers, renamed, with these funders, price and length (programs are data)."""
    import yaml

    from entitlement.config import ROOT
    raw = yaml.safe_load((ROOT / "programs" / "premium-job-seekers.yaml").read_text(encoding="utf-8"))
    raw["id"] = pid
    params = raw["parameters"]
    for name, value in (("funders", funders), ("price_per_month_cents", price), ("activation_months", months)):
        params[name] = {"values": {"2015-09-01": {"value": value, "reference": "test"}}}
    (dir_ / f"{pid}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


def test_three_uneven_funders_are_booked_month_by_month_without_a_negative_or_overspent_cent(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A program an operator may configure: three funders at 3 / 9996 / 1 bp, 15 EUR a month. Settled
    month by month then revoked, through the real server: every ledger entry positive, no funder
    ever past its commitment, the doctor clean at every step (the fourth month booked -1 cent for
    the third funder before; found by a review)."""
    from entitlement import doctor
    shares = {"funder-a": 3, "funder-b": 9996, "funder-c": 1}
    programs = tmp_path / "programs"
    programs.mkdir()
    _program_with(programs, "three-uneven", shares, 1500, 12)
    with own_server(backend[0], tmp_path / "own", request, programs_dir=programs) as h:
        api = Api(h)
        name = activate(api, "three-uneven").name
        activation_id = name.split("/")[1]
        problems = []
        for day in (D(2026, 3, 20), D(2026, 4, 20), D(2026, 5, 20), D(2026, 6, 20), D(2026, 7, 20)):
            with on_day(h, day):
                jobs.run_settlement(h.ctx, activation_ids=[activation_id])
                problems += [(day, p) for p in doctor.check(h.ctx.db)]
        with on_day(h, D(2026, 8, 1)):
            move(api, "revoke", name)
            problems += [("revoked", p) for p in doctor.check(h.ctx.db)]
        assert problems == []
        with h.ctx.db.read() as s:
            rows = s.execute(select(LedgerEntry.kind, LedgerEntry.funder_id, LedgerEntry.month,
                                    LedgerEntry.amount_cents).where(LedgerEntry.activation_id == activation_id)
                             .order_by(LedgerEntry.id)).all()
        assert [r for r in rows if r.amount_cents < 0] == []
        committed = {r.funder_id: r.amount_cents for r in rows if r.kind == "commit"}
        closed: dict[str, int] = defaultdict(int)
        per_month: dict[str, int] = defaultdict(int)
        for r in rows:
            if r.kind != "commit":
                closed[r.funder_id] += r.amount_cents
                assert closed[r.funder_id] <= committed.get(r.funder_id, 0), (r, dict(closed), committed)
            if r.kind == "consume":
                per_month[r.month] += r.amount_cents
        assert dict(per_month) == {m: 1500 for m in ("2026-03", "2026-04", "2026-05", "2026-06", "2026-07")}
        assert {f: closed[f] for f in committed} == committed  # revoked: everything closed, exactly


def test_a_funder_whose_share_of_a_month_rounds_to_nothing_still_counts_that_person_month(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """audit.proto: `person_months_consumed` counts the activations with a consume entry of the
    funder that month. A funder at 1 bp of 20 EUR (0.2 cent a month) had an entry one month in five,
    so its report counted one person-month where five were consumed (found by a review): every
    consumed month now books an entry for every funder, 0 cents included."""
    from entitlement import doctor
    programs = tmp_path / "programs"
    programs.mkdir()
    _program_with(programs, "tiny-share", {"funder-a": 1, "funder-b": 9999}, 2000, 12)
    with own_server(backend[0], tmp_path / "own", request, programs_dir=programs) as h:
        api = Api(h)
        name = activate(api, "tiny-share").name
        with on_day(h, D(2026, 7, 20)):  # the months beginning 16 March to 16 July: five
            jobs.run_settlement(h.ctx, activation_ids=[name.split("/")[1]])
            assert doctor.check(h.ctx.db) == []
        report = api.admin.GetFundingReport(audit_pb2.GetFundingReportRequest(program="programs/tiny-share"))
        months = {(r.funder, r.month): (r.consumed_cents, r.person_months_consumed) for r in report.rows
                  if r.consumed_cents or r.person_months_consumed}
        labels = ("2026-03", "2026-04", "2026-05", "2026-06", "2026-07")
        assert {m: months.get(("funder-a", m), (0, 0))[1] for m in labels} == dict.fromkeys(labels, 1)
        assert {m: months.get(("funder-b", m), (0, 0))[1] for m in labels} == dict.fromkeys(labels, 1)
        assert sum(months[("funder-a", m)][0] + months[("funder-b", m)][0] for m in labels) == 5 * 2000


def test_a_usage_report_without_used_is_a_month_not_used(h: Harness, api: Api) -> None:
    """activation.proto: `used` is REQUIRED, but proto3 cannot tell it unset from false: a report
    without it is accepted as "not used" and consumes nothing (a later `used = true` still does)."""
    act, account = activate_and_redeem(api, OPENCFA)
    api.platform.ReportUsage(activation_pb2.ReportUsageRequest(account_id=account, month="2026-03"))
    expect(h, act.name, consumed=[], released_months=0, program=OPENCFA)
    report_usage(api, account, "2026-03", True)
    expect(h, act.name, consumed=["2026-03"], released_months=0, program=OPENCFA)
