"""The deadline of the call being served, for the storage layer (entitlement/storage/db.py).

The gRPC edge binds it for every call (entitlement/api/wrapping.py); commands and jobs run with
none bound, unchanged. With a deadline bound, the database:
- refuses to start a write transaction when less than FLOOR_S remains (DEADLINE_EXCEEDED): the
  caller would give up before it commits;
- waits for locks no longer than the deadline (PostgreSQL: `SET LOCAL lock_timeout` and
  `statement_timeout`; SQLite: `PRAGMA busy_timeout`), and reports a wait cut short by it as
  DEADLINE_EXCEEDED, not as an outage;
- rolls a write back instead of committing it when the caller is gone meanwhile (deadline passed
  or call cancelled): no work is committed for a caller that gave up, except between this last
  check and the commit: an instant, or on SQLite, for a write that shared its commit with the
  writers queued behind it (group commit, storage/db.py), the time their blocks take (other
  calls' short writes: work outside a call, or marked long, never joins). That race cannot be
  closed from the server: a client that gave up retries with the same request_id (AIP-155) and
  gets the one answer.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import NamedTuple

from entitlement.errors import Cancelled, DeadlineExceeded

FLOOR_S = 0.05  # below this much time left, a write transaction is not started
NO_DEADLINE_S = 7 * 24 * 3600.0  # gRPC reports "no deadline" as a remaining time of centuries


class Budget(NamedTuple):  # (a named tuple: one is made per call, a frozen dataclass costs more)
    expires: float | None  # time.monotonic() at which the caller gives up; None: no deadline
    active: Callable[[], bool]  # False once the call is over for the client (cancelled, expired)


_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("call_deadline", default=None)


def _always() -> bool:
    return True


def enter(remaining_s: float | None, active: Callable[[], bool] = _always) -> contextvars.Token[Budget | None]:
    """From now on (in this context), a call with `remaining_s` seconds left (None: no deadline),
    over for its client once `active()` is False; `leave(token)` ends it. What `with bound(...)`
    does, for the gRPC edge's unary calls (entitlement/api/wrapping.py), which bind it in a
    try/finally of their own: no object made per call."""
    expires = None if remaining_s is None or remaining_s >= NO_DEADLINE_S else time.monotonic() + remaining_s
    return _current.set(Budget(expires, active))


leave: Callable[[contextvars.Token[Budget | None]], None] = _current.reset
"""`leave(token)`: the deadline bound before `enter` gave `token` holds again."""


class bound:  # noqa: N801 - used as a function: `with deadline.bound(...)`
    """Run the block as a call with `remaining_s` seconds left (None: no deadline)."""

    __slots__ = ("_remaining_s", "_active", "_reset")

    def __init__(self, remaining_s: float | None, active: Callable[[], bool] = _always) -> None:
        self._remaining_s, self._active = remaining_s, active

    def __enter__(self) -> None:
        self._reset = enter(self._remaining_s, self._active)

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._reset)


def bind(remaining_s: float | None) -> None:
    """Bound the rest of this thread's context to `remaining_s` seconds from now (None: no
    deadline), for threads that own their context (the database health monitor's ping)."""
    enter(remaining_s)


def in_call() -> bool:
    """Whether this context serves a call (its budget bound, deadline or not), rather than a
    background thread's, a job's or a command's work."""
    return _current.get() is not None


def remaining() -> float | None:
    """Seconds left to the bound deadline (negative once past), or None without one."""
    budget = _current.get()
    if budget is None or budget.expires is None:
        return None
    return budget.expires - time.monotonic()


def expired() -> bool:
    """The bound deadline is past, or too close to do anything more."""
    left = remaining()
    return left is not None and left < FLOOR_S


def exceeded() -> DeadlineExceeded:
    return DeadlineExceeded("the call's deadline passed before its work was committed; nothing was. "
                            "Retry with a longer deadline (and the same request_id)")


def check_start() -> None:
    """Before starting a write transaction: is there still a caller, with time left?"""
    budget = _current.get()
    if budget is None:
        return
    if expired():
        raise exceeded()
    if not budget.active():
        raise _cancelled()


def check_caller() -> None:
    """Just before committing: is the caller still waiting for the answer?"""
    budget = _current.get()
    if budget is None or budget.active():
        return
    raise exceeded() if expired() else _cancelled()


def over(settle_s: float = 0.0) -> bool:
    """Whether the call is over for its client (deadline passed, or cancelled), waiting up to
    `settle_s` for a cancellation to show: gRPC may report a cancelled call's request stream as
    ended a moment before it reports the call itself as cancelled."""
    budget = _current.get()
    if budget is None:
        return False
    left = remaining()
    if (left is not None and left <= 0) or not budget.active():
        return True
    until = time.monotonic() + settle_s  # (a deadline passing meanwhile is the caller's next check's)
    while time.monotonic() < until:
        time.sleep(0.005)
        if not budget.active():
            return True
    return False


def _cancelled() -> Cancelled:
    return Cancelled("the call was cancelled before its work was committed; nothing was")
