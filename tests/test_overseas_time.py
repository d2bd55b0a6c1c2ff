"""A service in another time zone than Paris (ENTITLEMENT_TIMEZONE): French overseas departments
have their own job seekers and agencies. Through the real server on both backends, with its clock
in that zone (tests/own_server.py: the FixedClock follows the settings' zone): an activation
starts on the local civil date, its token dies at local midnight after the end date, a revocation
and the settlement job count months by the local day, and the funding report counts the
revocation in the local month (from the raw rows, and from a rollup rebuilt in that zone).

The instants are chosen where the local date and the UTC date differ: 00:30 in Nouméa (UTC+11) is
13:30 UTC the day before; 23:30 in Cayenne (UTC-3) is 02:30 UTC the day after."""

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

from entitlement import jobs, rollup
from entitlement.storage.models import LedgerEntry
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
    return api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="overseas"))


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
