"""Access log and error mapping: the outermost behaviour (entitlement/api/wrapping.py).

Every call gets a request id (the caller's `x-request-id` metadata when well-formed, else a new
one), one JSON log line (method, caller, status code, latency), and its exceptions mapped:
domain errors to their AIP-193 status, database outages to UNAVAILABLE, anything else to a clean
INTERNAL that carries only the request id: no SQL, no stack trace, no personal data leaves.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import grpc
import structlog
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from entitlement import logs
from entitlement.api import errors
from entitlement.api.wrapping import BehaviorInterceptor
from entitlement.errors import DomainError

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
log = structlog.get_logger("entitlement.rpc")


def _request_id(metadata: tuple[Any, ...] | None) -> str:
    for key, value in metadata or ():
        if key == "x-request-id" and REQUEST_ID_RE.fullmatch(str(value)):
            return str(value)
    return os.urandom(8).hex()


# SQLite raises OperationalError both for a busy or unreachable file (worth retrying) and for schema
# errors such as a missing table (not worth retrying): only the former are outages.
_SQLITE_OUTAGE = ("database is locked", "database is busy", "unable to open", "disk i/o", "readonly database")


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, OperationalError):
        if exc.orig is not None and type(exc.orig).__module__.startswith("sqlite3"):
            return any(m in str(exc.orig).lower() for m in _SQLITE_OUTAGE)
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class AccessLogInterceptor(BehaviorInterceptor):
    def __init__(self, on_outage: Callable[[], None] | None = None) -> None:
        self._on_outage = on_outage  # the database health monitor's `outage_seen` (entitlement/dbhealth.py)

    def scope(self, method: str, metadata: tuple[Any, ...] | None,
              context: grpc.ServicerContext) -> AbstractContextManager[None]:
        return _Logged(self._on_outage, method, metadata, context)


class _Logged:
    """One call's scope: its request id bound, its exceptions mapped, its line written. A class
    rather than a generator (it wraps every call)."""

    __slots__ = ("_on_outage", "_context", "_rid", "_started")

    def __init__(self, on_outage: Callable[[], None] | None, method: str, metadata: tuple[Any, ...] | None,
                 context: grpc.ServicerContext) -> None:
        self._rid = _request_id(metadata)
        logs.begin_call(self._rid, method)
        self._on_outage, self._context = on_outage, context

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, _type: type[BaseException] | None, exc: BaseException | None, _tb: object) -> bool:
        code = "OK"
        try:
            if isinstance(exc, DomainError):
                status_code, status = errors.domain_status(exc, self._rid)
                code = status_code.name
                if status_code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.info("access_refused", reason=exc.reason)
                if getattr(exc, "database_wait", False) and self._on_outage is not None:
                    self._on_outage()  # a lock wait cut by the deadline: the monitor probes the database
                self._context.abort_with_status(status)
            elif isinstance(exc, Exception):
                if _is_outage(exc):
                    code = "UNAVAILABLE"
                    log.warning("database_unavailable", error=type(exc).__name__)
                    if self._on_outage is not None:
                        self._on_outage()
                    self._context.abort_with_status(errors.unavailable_status(self._rid))
                if _is_abort(self._context):
                    return False  # the handler aborted the call itself: its status stands
                code = "INTERNAL"
                # The traceback stays in our logs; exception text from the database driver is never
                # shown to callers, and the engine hides bound parameters (hide_parameters=True).
                log.error("unhandled_exception", error=type(exc).__name__, exc_info=exc)
                self._context.abort_with_status(errors.internal_status(self._rid))
            return False  # no exception, or one that is not an Exception (GeneratorExit): as it is
        finally:
            # Milliseconds to the microsecond: what round(x, 3) gives (but at exact half-microsecond
            # ties, rounded up here), without its detour through a decimal string.
            logs.rpc(code, int((time.perf_counter() - self._started) * 1_000_000 + 0.5) / 1000)


def _is_abort(context: grpc.ServicerContext) -> bool:
    """True when a handler already aborted the call itself (grpc raises to unwind it)."""
    code = getattr(context, "code", lambda: None)()
    return code is not None and code != grpc.StatusCode.OK
