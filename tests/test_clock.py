"""SystemClock.today() is computed once per civil day (entitlement/clock.py `day_span`)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from own_server import next_ledger_person, own_server
from support import TODAY, As, date_msg, expect_error, identity

from entitlement.clock import SystemClock, day_span
from entitlement.v1 import eligibility_pb2

# Paris (the service's), and zones whose DST changes happened at midnight (no 00:00 that day).
ZONES = ["Europe/Paris", "America/Sao_Paulo", "America/Havana", "Asia/Tehran", "Pacific/Apia", "UTC"]


@settings(max_examples=400, deadline=None)
@given(epoch=st.floats(min_value=946_684_800, max_value=4_102_444_800, allow_nan=False),
       zone=st.sampled_from(ZONES))
def test_the_span_is_the_civil_day_around_the_instant(epoch: float, zone: str) -> None:
    tz = ZoneInfo(zone)
    day, start, end = day_span(epoch, tz)
    assert day == dt.datetime.fromtimestamp(epoch, tz).date()
    assert start - 1e-6 <= epoch < end  # (fromtimestamp rounds to the microsecond)
    assert dt.datetime.fromtimestamp(start, tz).date() == day  # the first instant of the day
    assert dt.datetime.fromtimestamp(start - 0.001, tz).date() < day
    assert dt.datetime.fromtimestamp(end, tz).date() > day  # the first instant after it


def test_today_is_the_civil_date_now() -> None:
    for zone in ZONES:
        clock = SystemClock(zone)
        before = dt.datetime.now(ZoneInfo(zone)).date()
        got = clock.today(), clock.today()
        after = dt.datetime.now(ZoneInfo(zone)).date()
        assert got[0] == got[1] and before <= got[0] <= after


def test_dates_default_to_today_in_the_services_time_zone(backend: tuple[str, str], tmp_path: Path,
                                                          request: pytest.FixtureRequest) -> None:
    """The contract's civil dates are the service's calendar (ENTITLEMENT_TIMEZONE), not Paris's
    whatever the setting: at 10:00 UTC on 16 March it is still the 15th in Pago Pago (UTC-11). An
    `as_of` left empty is that day, and the 16th is a date in the future there."""
    with own_server(backend[0], tmp_path / "pago", request, timezone="Pacific/Pago_Pago") as h:
        advisor = As(h.channel, h.tokens["advisor-paris"])
        who = next_ledger_person()
        [d] = advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
            job_seeker=identity(*who), program="programs/premium-job-seekers")).decisions
        assert (d.as_of.year, d.as_of.month, d.as_of.day) == (2026, 3, 15)
        f = expect_error(advisor.CheckEligibility, eligibility_pb2.CheckEligibilityRequest(
            job_seeker=identity(*who), as_of=date_msg(TODAY)), grpc.StatusCode.INVALID_ARGUMENT)
        assert set(f.fields) == {"as_of"}
