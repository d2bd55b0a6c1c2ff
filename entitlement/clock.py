"""Time as the service sees it. Injected everywhere so that tests and recomputations can fix it."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Protocol
from zoneinfo import ZoneInfo


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current instant, timezone-aware, UTC."""

    def today(self) -> dt.date:
        """The current civil date in the service's timezone (ENTITLEMENT_TIMEZONE, Europe/Paris by default)."""

    def moment(self) -> tuple[dt.datetime, dt.date]:
        """`now()` and the civil date of that very instant, read once: the two calls one after the
        other can straddle midnight (a revocation logged at 23:59:59.999999 and settled as of the
        next day consumed a month of access the log says it never had)."""


@dataclass(frozen=True)
class SystemClock:
    timezone: str = "Europe/Paris"

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def today(self) -> dt.date:
        """Every call asks it: computed once per civil day, then looked up (a time zone conversion
        is a tenth of a token verification)."""
        return self._day(time.time())

    def moment(self) -> tuple[dt.datetime, dt.date]:
        epoch = time.time()
        return dt.datetime.fromtimestamp(epoch, dt.timezone.utc), self._day(epoch)

    def _day(self, epoch: float) -> dt.date:
        span = _DAYS.get(self.timezone)
        if span is None or not span[1] <= epoch < span[2]:  # a new day, or the system clock stepped back
            span = _DAYS[self.timezone] = day_span(epoch, ZoneInfo(self.timezone))
        return span[0]


def day_span(epoch: float, zone: ZoneInfo) -> tuple[dt.date, float, float]:
    """The civil date in `zone` at the instant `epoch`, and the instants that day begins and ends
    (the next day's first instant), as epoch seconds."""
    day = dt.datetime.fromtimestamp(epoch, zone).date()
    start = dt.datetime.combine(day, dt.time(), zone).timestamp()
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone).timestamp()
    return day, start, end


_DAYS: dict[str, tuple[dt.date, float, float]] = {}


class FixedClock:
    """A clock that only moves when told to (tests, replays)."""

    def __init__(self, now: dt.datetime, timezone: str = "Europe/Paris") -> None:
        if now.tzinfo is None:
            raise ValueError("FixedClock needs an aware datetime")
        self._now = now
        self._tz = ZoneInfo(timezone)

    def now(self) -> dt.datetime:
        return self._now

    def today(self) -> dt.date:
        return self._now.astimezone(self._tz).date()

    def moment(self) -> tuple[dt.datetime, dt.date]:
        now = self._now
        return now, now.astimezone(self._tz).date()

    def advance(self, delta: dt.timedelta) -> None:
        self._now += delta
