"""Civil days at the edges, through the real server on both backends with its clock in the
service's zone (tests/own_server.py: the FixedClock follows ENTITLEMENT_TIMEZONE): the two DST
switch days of Europe/Paris, and a service in another zone (French overseas departments have their
own job seekers and agencies). An activation starts on the local civil date, its token dies at
local midnight after the end date, suspensions, revocations and the settlement job count months by
the local day, and the funding report counts a revocation in the local month (from the rollup,
from the raw rows when the rollup was built in another zone, and from a rollup rebuilt in it).

The instants are chosen where the local date and the UTC date differ: 00:30 in Paris is 22:30 or
23:30 UTC the day before; 00:30 in Nouméa (UTC+11) is 13:30 UTC the day before; 23:30 in Cayenne
(UTC-3) is 02:30 UTC the day after."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jwt
import pytest
from sqlalchemy import select

from own_server import next_ledger_person, own_server
from support import Api, Harness, identity

from entitlement import jobs, ledger, registry, rollup
from entitlement.storage.models import Activation, LedgerEntry
from entitlement.v1 import activation_pb2, audit_pb2

D = dt.date
UTC = dt.timezone.utc
FUNDERS = ("france-travail", "ministry-of-labour")


@contextmanager
def server_in(zone: str, backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    with own_server(backend[0], tmp_path, request, timezone=zone, token_ttl_days=800) as h:
        yield h


def at(h: Harness, when: dt.datetime) -> None:
    h.clock.advance(when - h.clock.now())


def activate(api: Api) -> activation_pb2.ActivateEntitlementResponse:
    agency_id, birth = next_ledger_person()
    resp: activation_pb2.ActivateEntitlementResponse = api.advisor.ActivateEntitlement(
        activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
            platform="platforms/openclassrooms", reason="overseas"))
    return resp


def day(d: object) -> dt.date:
    return D(d.year, d.month, d.day)  # type: ignore[attr-defined]


def consumed_months(h: Harness, name: str) -> list[str]:
    with h.ctx.db.read() as s:
        return sorted({m for m, in s.execute(select(LedgerEntry.month).where(
            LedgerEntry.activation_id == name.split("/")[1], LedgerEntry.kind == "consume"))})


def report(api: Api) -> dict[tuple[str, str], tuple[int, int]]:
    rows = api.admin.GetFundingReport(audit_pb2.GetFundingReportRequest(program="programs/premium-job-seekers")).rows
    return {(r.funder, r.month): (r.activations_live, r.activations_ended) for r in rows}


def test_noumea_dates_tokens_revocation_and_report_follow_the_local_day(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with server_in("Pacific/Noumea", backend, tmp_path, request) as h:
        api = Api(h)
        at(h, dt.datetime(2026, 3, 16, 13, 30, tzinfo=UTC))  # 00:30 on 17 March in Nouméa
        assert h.clock.today() == D(2026, 3, 17)
        resp = activate(api)
        a = resp.activation
        assert (day(a.start_date), day(a.end_date)) == (D(2026, 3, 17), D(2027, 3, 16))
        exp = jwt.decode(resp.activation_token, options={"verify_signature": False})["exp"]
        assert dt.datetime.fromtimestamp(exp, UTC) == dt.datetime(2027, 3, 16, 13, 0, tzinfo=UTC)  # local midnight

        # 00:30 on 17 April in Nouméa, 16 April in UTC: the second month of access (17 April -
        # 16 May) has begun, and a revocation that day owes it (its day counts as on).
        at(h, dt.datetime(2026, 4, 16, 13, 30, tzinfo=UTC))
        api.advisor.RevokeActivation(activation_pb2.TransitionActivationRequest(name=a.name, reason="found a job"))
        assert consumed_months(h, a.name) == ["2026-03", "2026-04"]

        # The report counts it live at the end of March and ended in April, from the raw rows (the
        # rollup was built in Paris time) and from the rollup once rebuilt in Nouméa time.
        expected = {(f, m): v for f in FUNDERS for m, v in (("2026-03", (1, 0)), ("2026-04", (0, 1)))}
        assert report(api) == expected
        rollup.rebuild(h.ctx.db, "Pacific/Noumea")
        assert report(api) == expected


def test_cayenne_settles_and_expires_by_the_local_day(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with server_in("America/Cayenne", backend, tmp_path, request) as h:
        api = Api(h)
        at(h, dt.datetime(2026, 3, 17, 2, 30, tzinfo=UTC))  # 23:30 on 16 March in Cayenne
        resp = activate(api)
        a = resp.activation
        assert (day(a.start_date), day(a.end_date)) == (D(2026, 3, 16), D(2027, 3, 15))
        exp = jwt.decode(resp.activation_token, options={"verify_signature": False})["exp"]
        assert dt.datetime.fromtimestamp(exp, UTC) == dt.datetime(2027, 3, 16, 3, 0, tzinfo=UTC)

        # 23:30 on 15 April in Cayenne (16 April in UTC): the second month of access begins on the
        # 16th locally, so it is not owed yet.
        at(h, dt.datetime(2026, 4, 16, 2, 30, tzinfo=UTC))
        jobs.run_settlement(h.ctx, activation_ids=[a.name.split("/")[1]])
        assert consumed_months(h, a.name) == ["2026-03"]

        # 23:30 on the end date in Cayenne (already the next day in UTC): still live, a token
        # redeems; an hour later (00:30 locally) the activation has expired.
        at(h, dt.datetime(2027, 3, 16, 2, 30, tzinfo=UTC))
        status = api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=resp.activation_token, account_id="acct-cayenne"))
        assert status.active
        at(h, dt.datetime(2027, 3, 16, 3, 30, tzinfo=UTC))
        got = api.platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id="acct-cayenne"))
        assert not got.active and got.state == activation_pb2.EXPIRED



def fresh_extract(h: Harness, tmp_path: Path) -> None:
    """The own server's registry again, extracted the day before the server's today."""
    registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock, tmp_path / "registry.csv",
                            extracted_on=h.clock.today() - dt.timedelta(days=1))


def test_paris_dst_days_count_by_the_local_day(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Sunday 25 October 2026 (03:00 -> 02:00, an hour twice) and Sunday 28 March 2027 (02:00 ->
    03:00). An activation made at 00:30 on 25 October in Paris (22:30 UTC the day before, summer
    time) starts that day and ends on 24 October 2027; its token dies at midnight in Paris (22:00
    UTC, summer time again), and it is live at 23:59:59 on its end date. A suspension at 23:30 on
    25 October (22:30 UTC, winter time) and a resumption at 00:30 on the 26th are on those days.
    An activation from 28 January 2027 has its third month of access from 28 March: settled at
    23:30 on the 27th it is not begun; revoked at 00:30 on the 28th (23:30 UTC on the 27th) it is
    owed (a revocation's day counts as on), and the report counts the revocation in March."""
    with server_in("Europe/Paris", backend, tmp_path, request) as h:
        api = Api(h)
        at(h, dt.datetime(2026, 10, 24, 22, 30, tzinfo=UTC))  # 00:30 on Sunday 25 October, summer time
        fresh_extract(h, tmp_path)
        resp = activate(api)
        b = resp.activation
        assert (day(b.start_date), day(b.end_date)) == (D(2026, 10, 25), D(2027, 10, 24))
        exp = jwt.decode(resp.activation_token, options={"verify_signature": False})["exp"]
        assert dt.datetime.fromtimestamp(exp, UTC) == dt.datetime(2027, 10, 24, 22, 0, tzinfo=UTC)
        at(h, dt.datetime(2026, 10, 25, 22, 30, tzinfo=UTC))  # 23:30 on Sunday 25 October, winter time
        api.advisor.SuspendActivation(activation_pb2.TransitionActivationRequest(name=b.name, reason="pause"))
        at(h, dt.datetime(2026, 10, 25, 23, 30, tzinfo=UTC))  # 00:30 on Monday 26 October
        api.advisor.ResumeActivation(activation_pb2.TransitionActivationRequest(name=b.name, reason="back"))
        with h.ctx.db.read() as s:
            row = s.get(Activation, b.name.split("/")[1])
            assert row is not None
            assert [(t.day, t.kind) for t in ledger.history(s, row, "Europe/Paris")] == [
                (D(2026, 10, 25), "suspend"), (D(2026, 10, 26), "resume")]

        at(h, dt.datetime(2027, 1, 28, 10, 0, tzinfo=UTC))
        fresh_extract(h, tmp_path)
        a = activate(api).activation
        assert day(a.start_date) == D(2027, 1, 28)
        at(h, dt.datetime(2027, 3, 27, 22, 30, tzinfo=UTC))  # 23:30 on Saturday 27 March in Paris
        jobs.run_settlement(h.ctx, activation_ids=[a.name.split("/")[1]])
        assert consumed_months(h, a.name) == ["2027-01", "2027-02"]  # the third begins on the 28th
        at(h, dt.datetime(2027, 3, 27, 23, 30, tzinfo=UTC))  # 00:30 on Sunday 28 March in Paris
        api.advisor.RevokeActivation(activation_pb2.TransitionActivationRequest(name=a.name, reason="moved"))
        assert consumed_months(h, a.name) == ["2027-01", "2027-02", "2027-03"]
        assert report(api)[(FUNDERS[0], "2027-03")] == (1, 1)  # b live at the end of March, a ended

        at(h, dt.datetime(2027, 10, 24, 21, 59, 59, tzinfo=UTC))  # 23:59:59 on b's end date in Paris
        status = api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=resp.activation_token, account_id="acct-paris"))
        assert status.active
        at(h, dt.datetime(2027, 10, 24, 22, 0, tzinfo=UTC))  # midnight: access ended
        got = api.platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id="acct-paris"))
        assert not got.active and got.state == activation_pb2.EXPIRED
