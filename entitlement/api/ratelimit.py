"""Per-caller rate limit on the calls that look people up: CheckEligibility and ActivateEntitlement
share one token bucket per caller id (ENTITLEMENT_CHECK_RATE_PER_MIN tokens a minute, at most
ENTITLEMENT_CHECK_BURST at once). A call finding the bucket empty is answered RESOURCE_EXHAUSTED,
reason RATE_LIMITED, with a google.rpc.RetryInfo whose retry_delay says when one token is back.

The buckets live in the memory of each server process: with N processes behind a load balancer a
caller gets up to N times the rate. That bounds abuse (enumerating the registry through one
advisor's credentials) without a shared store; the limit is per process by design.

The interceptor runs after the caller interceptor: only authenticated callers have a bucket, so
the number of buckets is bounded by the number of callers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc

from entitlement.api.identity import _caller
from entitlement.api.wrapping import BehaviorInterceptor, Handler
from entitlement.errors import RateLimited
from entitlement.storage.db import LoopWriteDeferred

LIMITED = frozenset({
    "/entitlement.v1.EligibilityService/CheckEligibility",
    "/entitlement.v1.ActivationService/ActivateEntitlement",
})


class TokenBuckets:
    """One bucket per key: `rate_per_min` tokens a minute, `burst` at most."""

    def __init__(self, rate_per_min: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_min <= 0 or burst < 1:
            raise ValueError("the rate must be positive and the burst at least 1")
        self.rate = rate_per_min / 60.0  # tokens a second
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def give_back(self, key: str) -> None:
        """Return a token taken by a call that did not run (it runs again and takes one then)."""
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, self._clock()))
            self._buckets[key] = (min(self.burst, tokens + 1.0), at)


class RateLimitInterceptor(BehaviorInterceptor):
    def __init__(self, buckets: TokenBuckets, methods: frozenset[str] = LIMITED) -> None:
        self.buckets = buckets
        self.methods = methods

    def applies_to(self, method: str) -> bool:
        return method in self.methods

    def scope(self, method: str, metadata: tuple[Any, ...] | None,
              context: grpc.ServicerContext) -> AbstractContextManager[None]:
        """Takes the caller's token now (refusing the call when there is none); nothing to undo."""
        if method in self.methods:
            self._take()
        return _NOTHING

    def around_unary(self, fn: Handler, method: str) -> Handler:
        """What `scope` does, without a context manager per call."""
        if method not in self.methods:
            return fn
        take, give_back = self._take, self._give_back

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            take()
            try:
                return fn(request, context)
            except LoopWriteDeferred:  # the call runs again in the pool, taking its token there
                give_back()
                raise
        return unary

    def _give_back(self) -> None:
        caller = _caller.get()
        if caller is not None:
            self.buckets.give_back(caller.id)

    def _take(self) -> None:
        """The calling caller's token, taken; RateLimited when there is none."""
        caller = _caller.get()
        if caller is not None:
            wait = self.buckets.take(caller.id)
            if wait > 0:
                per_min = round(self.buckets.rate * 60)
                raise RateLimited(
                    f"too many calls: at most {per_min} a minute (burst {int(self.buckets.burst)}) of "
                    f"CheckEligibility and ActivateEntitlement per caller; retry in {wait:.1f} s",
                    retry_delay_s=wait, metadata={"limit_per_minute": str(per_min),
                                                  "retry_after_ms": str(max(1, round(wait * 1000)))})


_NOTHING = nullcontext()


def interceptor(rate_per_min: int, burst: int) -> RateLimitInterceptor | None:
    """The interceptor of the settings, or None when the limit is off (rate 0)."""
    if rate_per_min <= 0:
        return None
    return RateLimitInterceptor(TokenBuckets(rate_per_min, max(burst, 1)))
