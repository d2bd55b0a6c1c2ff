"""The funding ledger after random histories of an advisor's transitions, usage reports and
settlement runs (sequential, then concurrent), against a model of its own: access kept day by day
(a day is on when access was on at any moment of it), the months owed and released derived from
those days as README "Money and jobs" and entitlement/consumption.py's docstring say, not from
entitlement.consumption. After every settlement run each activation's consume entries are exactly
the months the model owes, its releases exactly the months that can no longer be owed, and the
funding report's rollup equals its recomputation from the raw rows. A failure names its seed
(LEDGER_MODEL_SEED replays it)."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
from sqlalchemy import select

from own_server import next_ledger_person, own_server
from support import Api, Harness, identity

from entitlement import jobs, rollup
from entitlement.rules import add_months
from entitlement.storage.models import Event, LedgerEntry
from entitlement.v1 import activation_pb2

PREMIUM, OPENCFA = "premium-job-seekers", "opencfa-apprentices"  # funders owe months of access / of use
PRICE, MONTHS, REPORT_DAYS = 2000, 12, 31
ONE = dt.timedelta(days=1)
SEED = int(os.environ.get("LEDGER_MODEL_SEED", random.randrange(1_000_000)))
METHODS = {"suspend": "SuspendActivation", "resume": "ResumeActivation", "revoke": "RevokeActivation"}
ALLOWED = {"suspend": ("active",), "resume": ("suspended",), "revoke": ("active", "suspended")}


def day_of(d: object) -> dt.date:
    return dt.date(d.year, d.month, d.day)  # type: ignore[attr-defined]


class Model:
    """One activation: its state, the days access was on, the months reported used."""

    def __init__(self, start: dt.date, end: dt.date, use: bool = False, account: str = "") -> None:
        self.start, self.end, self.use, self.account = start, end, use, account
        self.state = "active"
        self.since: dt.date | None = start  # access on since that day (None: off)
        self.on: set[dt.date] = set()
        self.reported: set[str] = set()

    def _mark(self, first: dt.date, last: dt.date) -> None:
        d = first
        while d <= min(last, self.end):
            self.on.add(d)
            d += ONE

    def live(self, today: dt.date) -> bool:
        return self.state in ("active", "suspended") and today <= self.end

    def move(self, action: str, today: dt.date) -> bool:
        """Apply a transition made on `today`; False when the service must refuse it."""
        if not self.live(today) or self.state not in ALLOWED[action]:
            return False
        if self.since is not None and action in ("suspend", "revoke"):
            self._mark(self.since, today)  # the day of a suspension or a revocation is on
            self.since = None
        if action == "resume":
            self.since = today  # the day of a resumption is on
        self.state = {"suspend": "suspended", "resume": "active", "revoke": "revoked"}[action]
        return True

    def on_until(self, today: dt.date) -> set[dt.date]:
        on = set(self.on)
        d = self.since
        while d is not None and d <= min(today, self.end):
            on.add(d)
            d += ONE
        return on

    def months(self) -> list[tuple[str, dt.date, dt.date]]:
        """The months of access: (label, first day, last day)."""
        out = []
        for k in range(MONTHS):
            first = add_months(self.start, k)
            if first > self.end:
                break
            out.append((first.strftime("%Y-%m"), first, min(add_months(self.start, k + 1) - ONE, self.end)))
        return out

    def accessible(self, first: dt.date, last: dt.date, today: dt.date) -> bool:
        return first <= today and any(first <= d <= last for d in self.on_until(today))

    def report(self, label: str, today: dt.date) -> str:
        """The platform reports `label` used on `today`: the reason the service refuses it, or ""."""
        month = next((m for m in self.months() if m[0] == label), None)
        if month is None:
            return "MONTH_OUTSIDE_ACCESS"
        _, first, last = month
        if first > today:
            return "MONTH_NOT_BEGUN"
        if label in self.reported:
            return ""
        if not self.accessible(first, last, today):
            return "NO_ACCESS_IN_MONTH"
        if today > last + dt.timedelta(days=REPORT_DAYS):
            return "REPORT_WINDOW_CLOSED"
        self.reported.add(label)
        return ""

    def owed(self, today: dt.date) -> tuple[list[str], int]:
        """Once settled on `today`: the months consumed, and how many months are released."""
        live = self.live(today)
        if self.use:
            still_open = sum(1 for label, first, last in self.months() if label not in self.reported
                             and (self.accessible(first, last, today) or (live and today <= last))
                             and today <= last + dt.timedelta(days=REPORT_DAYS))
            return sorted(self.reported), MONTHS - still_open - len(self.reported)
        on = self.on_until(today)
        consumed = [label for label, first, last in self.months() if any(first <= d <= last for d in on)]
        still_open = sum(1 for label, _first, last in self.months() if label not in consumed and live and today <= last)
        return consumed, MONTHS - still_open - len(consumed)


def check(h: Harness, models: dict[str, Model], today: dt.date, where: object) -> None:
    with h.ctx.db.read() as s:
        rows = list(s.execute(select(LedgerEntry)).scalars())
        assert list(rollup.differences(s)) == [], where
    consumed: dict[str, set[str]] = defaultdict(set)
    cents: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        if r.kind == "consume":
            consumed[r.activation_id].add(r.month)
        cents[(r.activation_id, r.kind)] += r.amount_cents
    for name, m in models.items():
        aid = name.split("/")[1]
        months, released = m.owed(today)
        assert sorted(consumed[aid]) == months, (where, name, m.state, today)
        assert cents[(aid, "consume")] == PRICE * len(months), (where, name)
        assert cents[(aid, "release")] == PRICE * released, (where, name, m.state, today)


def activate(api: Api, program: str, rng: random.Random) -> tuple[str, Model]:
    agency_id, birth = next_ledger_person()
    use = program == OPENCFA
    resp = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=f"programs/{program}", platform="platforms/openclassrooms",
        reason="ledger model", mentor_id="M-0042" if use else ""))
    account = ""
    if use:
        account = f"learner-{rng.randrange(10**12)}"
        api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=resp.activation_token, account_id=account))
    a = resp.activation
    return a.name, Model(day_of(a.start_date), day_of(a.end_date), use, account)


def test_the_ledger_owes_what_the_days_of_access_say_after_a_random_history(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rng = random.Random(SEED)
    with own_server(backend[0], tmp_path / "own", request) as h:
        api = Api(h)
        h.clock.advance(dt.timedelta(hours=rng.choice([0, 13])))  # 10:00 or 23:00 UTC (past midnight in Paris)
        first_day = day = h.clock.today()
        models: dict[str, Model] = {}
        for step in range(120):
            h.clock.advance(dt.timedelta(days=(day - h.clock.today()).days))
            roll = rng.random()
            if (roll < 0.5 or len(models) < 3) and (day - first_day).days < 40:  # the registry is fresh
                name, model = activate(api, rng.choice([PREMIUM, OPENCFA]), rng)
                models[name] = model
            elif roll < 0.6 and any(m.use for m in models.values()):
                name = rng.choice(sorted(n for n, m in models.items() if m.use))
                m = models[name]
                label = (m.start + dt.timedelta(days=rng.randrange(-5, (day - m.start).days + 5))).strftime("%Y-%m")
                refused = m.report(label, day)
                try:
                    api.platform.ReportUsage(activation_pb2.ReportUsageRequest(
                        account_id=m.account, month=label, used=True))
                    assert not refused, (SEED, step, name, label, refused)
                except grpc.RpcError as exc:
                    assert refused and exc.code() == grpc.StatusCode.FAILED_PRECONDITION, (SEED, step, exc.details())
            elif roll < 0.85:
                name = rng.choice(sorted(models))
                action = rng.choice(["suspend", "resume", "revoke", "suspend", "resume"])
                allowed = models[name].move(action, day)
                try:
                    getattr(api.advisor, METHODS[action])(activation_pb2.TransitionActivationRequest(
                        name=name, reason="ledger model"))
                    assert allowed, (SEED, step, name, action)
                except grpc.RpcError as exc:
                    assert not allowed and exc.code() == grpc.StatusCode.FAILED_PRECONDITION, (SEED, step, exc.details())
            else:
                jobs.run_settlement(h.ctx)
                check(h, models, day, (SEED, step))
            early = (day - first_day).days <= 40
            day += dt.timedelta(days=rng.choice([0, 0, 1, 2, 3] if early else [0, 1, 2, 3, 5, 7, 12, 20, 31, 45]))
        h.clock.advance(dt.timedelta(days=(day + dt.timedelta(days=400) - h.clock.today()).days))
        jobs.run_settlement(h.ctx)  # everything has ended, every report window closed
        check(h, models, h.clock.today(), (SEED, "end"))


def model_from_log(h: Harness, name: str, start: dt.date, end: dt.date) -> Model:
    """The model of an activation from its events, by civil day (service time zone), in log order."""
    tz = ZoneInfo(h.ctx.settings.timezone)
    m = Model(start, end)
    with h.ctx.db.read() as s:
        events = list(s.execute(select(Event).where(Event.subject == name).order_by(Event.seq)).scalars())
    kinds = {"activation.suspended": "suspend", "activation.resumed": "resume", "activation.revoked": "revoke"}
    for e in events:
        if e.type in kinds:
            day = (e.time if e.time.tzinfo else e.time.replace(tzinfo=dt.timezone.utc)).astimezone(tz).date()
            assert m.move(kinds[e.type], day), (name, e.type, day)
            assert json.loads(e.payload_json)["to"] == m.state
    return m


def test_the_ledger_owes_what_the_log_says_after_concurrent_transitions_and_settlements(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two advisors' transitions of the same activations and settlement runs, all at once, day
    after day: every change the log holds was a change of the state it found, and the ledger owes
    what the log's days of access say."""
    rng = random.Random(SEED)
    with own_server(backend[0], tmp_path / "own", request) as h:
        api = Api(h)
        models = dict(activate(api, PREMIUM, rng) for _ in range(6))
        names = sorted(models)

        def run(op: tuple[str, str, str]) -> str:
            name, action, caller = op
            if name == "job":
                jobs.run_settlement(h.ctx)
                return "job"
            try:
                getattr(api.as_(caller), METHODS[action])(activation_pb2.TransitionActivationRequest(
                    name=name, reason="ledger model"))
                return "OK"
            except grpc.RpcError as exc:
                return str(exc.code().name)

        for phase in range(20):
            ops = [("job", "", "")] * 3 + [(rng.choice(names), rng.choice(["suspend", "resume", "suspend", "resume",
                                                                           "revoke"]),
                                            rng.choice(["advisor-paris", "admin"])) for _ in range(12)]
            rng.shuffle(ops)
            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(run, ops))
            assert set(answers) <= {"OK", "FAILED_PRECONDITION", "job"}, (SEED, phase, answers)
            jobs.run_settlement(h.ctx)
            check(h, {n: model_from_log(h, n, m.start, m.end) for n, m in models.items()}, h.clock.today(),
                  (SEED, phase))
            h.clock.advance(dt.timedelta(days=rng.choice([1, 3, 7, 15, 30])))
