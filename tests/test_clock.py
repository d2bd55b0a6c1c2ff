"""SystemClock.today() is computed once per civil day (entitlement/clock.py `day_span`)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from entitlement.clock import SystemClock, day_span

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
