"""Time as the service sees it. Injected everywhere so that tests and recomputations can fix it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol
from zoneinfo import ZoneInfo


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current instant, timezone-aware, UTC."""

    def today(self) -> dt.date:
        """The current civil date in the service's timezone (Europe/Paris)."""


@dataclass(frozen=True)
class SystemClock:
    timezone: str = "Europe/Paris"

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def today(self) -> dt.date:
        return self.now().astimezone(ZoneInfo(self.timezone)).date()


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

    def advance(self, delta: dt.timedelta) -> None:
        self._now += delta
