"""structlog set-up: one JSON object per line on stderr, with the fields of the call being served
(request id, method, caller, role) bound by the access log and the caller's identity. Log lines carry ids of staff and resources, pseudonyms of job seekers,
never a name, birth date or agency identifier."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _add_pid(_logger: object, _name: str, event: dict[str, object]) -> dict[str, object]:
    """Which server process wrote the line (several may share a port: ENTITLEMENT_PROCESSES)."""
    event["pid"] = os.getpid()
    return event


class _Sink:
    """The stream every line goes to: one write and a flush per line, under one lock, so that
    lines from concurrent calls never interleave (structlog's own lines and `rpc` below alike)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class _LineLogger:
    """structlog's logger: hands each rendered line to the sink."""

    def __init__(self, sink: _Sink) -> None:
        self._write = sink.write

    def msg(self, message: str) -> None:
        self._write(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


_sink: _Sink | None = None
_info_on = False
_JSON = json.JSONEncoder(sort_keys=True, default=repr)  # what JSONRenderer(sort_keys=True) calls, built once
_str = json.encoder.encode_basestring_ascii  # how that encoder writes a str (ensure_ascii)

# The fields of the call being served (request id, method, then caller and role), merged into every
# line it logs. One dict in one context variable, set by the access log when the call begins: gRPC
# runs each call in a context of its own, so nothing outlives the call.
_call: ContextVar[dict[str, Any] | None] = ContextVar("entitlement_call_fields", default=None)


def begin_call(request_id: str, method: str) -> None:
    """From now on (in this context), every line carries this call's request id and method."""
    _call.set({"method": method, "request_id": request_id})


def bind_call(**fields: Any) -> None:
    """Add fields to every further line of the call being served (nothing outside a call)."""
    current = _call.get()
    if current is not None:
        current.update(fields)


def _merge_call(_logger: object, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    fields = _call.get()
    if fields:
        for k, v in fields.items():
            event.setdefault(k, v)  # the line's own keys win, as with structlog's contextvars
    return event


def timestamp() -> str:
    """Now, as structlog's TimeStamper(fmt="iso", utc=True) writes it (2026-11-23T09:21:26.145077Z),
    with the date and time of the second formatted once per second."""
    now = time.time()
    second = int(now)
    cached = _second[0]
    if cached[0] != second:
        cached = _second[0] = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    micros = int((now - second) * 1_000_000)
    return f"{cached[1]}.{micros:06d}Z" if micros else f"{cached[1]}Z"


_second: list[tuple[int, str]] = [(-1, "")]  # (the second, its formatting), replaced whole
_PLAIN = frozenset({"caller", "method", "request_id", "role"})  # the call fields rpc() formats itself


def rpc(code: str, latency_ms: float) -> None:
    """The access log's line for one call (entitlement/api/accesslog.py): the same line as
    `structlog.get_logger().info("rpc", code=code, latency_ms=latency_ms)` with the processors
    below (the call's fields, level, pid, ISO UTC timestamp, JSON with sorted keys), written
    without them: every call writes one, and the processor chain cost a tenth of a check
    (tests/test_logs.py holds the two equal)."""
    sink = _sink
    if sink is None:  # not configured here: structlog's defaults
        structlog.get_logger("entitlement.rpc").info("rpc", code=code, latency_ms=latency_ms)
        return
    if not _info_on:
        return
    call = _call.get() or {}
    if call.keys() <= _PLAIN and all(type(v) is str for v in call.values()):
        # Sorted keys: caller, code, event, latency_ms, level, method, pid, request_id, role, timestamp.
        caller, role = call.get("caller"), call.get("role")
        method, request_id = call.get("method"), call.get("request_id")
        sink.write("".join((
            "{", "" if caller is None else f'"caller": {_str(caller)}, ',
            f'"code": {_str(code)}, "event": "rpc", "latency_ms": {float(latency_ms)!r}, "level": "info", ',
            "" if method is None else f'"method": {_str(method)}, ',
            f'"pid": {os.getpid()}, ',
            "" if request_id is None else f'"request_id": {_str(request_id)}, ',
            "" if role is None else f'"role": {_str(role)}, ',
            f'"timestamp": "{timestamp()}"}}')))
        return
    fields = dict(call)
    fields.update(code=code, event="rpc", latency_ms=latency_ms, level="info", pid=os.getpid(),
                  timestamp=timestamp())
    sink.write(_JSON.encode(fields))


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    if level not in LEVELS:
        raise SystemExit(f"ENTITLEMENT_LOG_LEVEL must be one of {', '.join(LEVELS)}, got {level!r}")
    global _sink, _info_on
    sink = _Sink(stream or sys.stderr)
    _sink, _info_on = sink, LEVELS[level] <= logging.INFO
    structlog.configure(
        processors=[
            _merge_call,  # (not structlog.contextvars: fields of a call go through bind_call)
            structlog.processors.add_log_level,
            _add_pid,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *_args: _LineLogger(sink),
        # Loggers are cached for speed, except when a stream is given (tests reconfigure per server).
        cache_logger_on_first_use=stream is None,
    )
