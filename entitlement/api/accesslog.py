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
from entitlement.api.wrapping import BehaviorInterceptor, Handler
from entitlement.errors import DomainError
from entitlement.storage.db import LoopWriteDeferred

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
log = structlog.get_logger("entitlement.rpc")


def _request_id(metadata: tuple[Any, ...] | None) -> str:
    for key, value in metadata or ():
        if key == "x-request-id" and REQUEST_ID_RE.fullmatch(str(value)):
            return str(value)
    return os.urandom(8).hex()


# SQLite raises OperationalError both for a busy, unreachable or full file (worth retrying) and for
# schema errors such as a missing table (not worth retrying): only the former are outages. A full
# disk ("database or disk is full", SQLITE_FULL: a COMMIT that cannot grow the log) is the operator's
# to fix, as an unreachable file is; nothing of the failed write was committed.
_SQLITE_OUTAGE = ("database is locked", "database is busy", "unable to open", "disk i/o", "readonly database",
                  "disk is full")


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

    def around_unary(self, fn: Handler, method: str) -> Handler:
        """What `scope` does, in the call's own frame (every call of ours goes through it)."""
        on_outage = self._on_outage

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            rid = _request_id(context.invocation_metadata())
            logs.begin_call(rid, method)
            started = time.perf_counter()
            code = "OK"
            try:
                return fn(request, context)
            except LoopWriteDeferred:
                code = ""  # run again in the pool, whose run writes the call's line
                raise
            except BaseException as exc:
                code = "UNKNOWN"  # what gRPC answers should _outcome itself fail (its logging)
                code, status = _outcome(exc, rid, context, on_outage)
                if status is None:
                    raise
                context.abort_with_status(status)
                raise  # (abort_with_status raises; a context whose abort returned lets the error through)
            finally:  # (the latency as _Logged.__exit__ rounds it, inline: every call)
                if code:
                    logs.rpc(code, int((time.perf_counter() - started) * 1_000_000 + 0.5) / 1000)
        return unary


def _outcome(exc: BaseException, rid: str, context: grpc.ServicerContext,
             on_outage: Callable[[], None] | None) -> tuple[str, grpc.Status | None]:
    """For a call that raised `exc`: the code its line says, and the status to abort it with
    (None: `exc` goes through as it is). Logs what the operators must see."""
    if isinstance(exc, DomainError):
        status_code, status = errors.domain_status(exc, rid)
        if status_code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            log.info("access_refused", reason=exc.reason)
        if getattr(exc, "database_wait", False) and on_outage is not None:
            on_outage()  # a lock wait cut by the deadline: the monitor probes the database
        return status_code.name, status
    if not isinstance(exc, Exception):
        return "OK", None  # GeneratorExit and the like: as it is
    if _is_outage(exc):
        log.warning("database_unavailable", error=type(exc).__name__)
        if on_outage is not None:
            on_outage()
        return "UNAVAILABLE", errors.unavailable_status(rid)
    aborted = _aborted(exc, context)
    if aborted is not None:
        return aborted.name, None  # the handler aborted the call itself: its status stands
    # The traceback stays in our logs; exception text from the database driver is never
    # shown to callers, and the engine hides bound parameters (hide_parameters=True).
    log.error("unhandled_exception", error=type(exc).__name__, exc_info=exc)
    return "INTERNAL", errors.internal_status(rid)


class _Logged:
    """One call's scope, for the methods that stream their responses (`around_unary` does the same
    for the others): its request id bound, its exceptions mapped, its line written."""

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
            if exc is not None:
                code = "UNKNOWN"  # (as in around_unary)
                code, status = _outcome(exc, self._rid, self._context, self._on_outage)
                if status is not None:
                    self._context.abort_with_status(status)
            return False
        finally:
            # Milliseconds to the microsecond: what round(x, 3) gives (but at exact half-microsecond
            # ties, rounded up here), without its detour through a decimal string.
            logs.rpc(code, int((time.perf_counter() - self._started) * 1_000_000 + 0.5) / 1000)


def _aborted(exc: BaseException, context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status of the call when a handler already aborted it itself (gRPC raises to unwind it),
    else None. The sync server's context knows it by then; the event-loop server's adapters carry
    it on the exception they raise (entitlement/aio_server.py `_AbortFromThread`), since the aio
    context is aborted only afterwards, on the loop."""
    code = getattr(exc, "abort_code", None)
    if code is None:
        code = getattr(context, "code", lambda: None)()
    return None if code is None or code == grpc.StatusCode.OK else code
