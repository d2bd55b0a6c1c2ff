"""structlog set-up: one JSON object per line on stderr, with the request context bound by the
access-log interceptor. Log lines carry ids of staff and resources, pseudonyms of job seekers,
never a name, birth date or agency identifier."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import threading
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
_UTC = dt.timezone.utc


def rpc(code: str, latency_ms: float) -> None:
    """The access log's line for one call (entitlement/api/accesslog.py): the same line as
    `structlog.get_logger().info("rpc", code=code, latency_ms=latency_ms)` with the processors
    below (the call's bound context, level, pid, ISO UTC timestamp, JSON with sorted keys), written
    without them: every call writes one, and the processor chain cost 30 us of a check's ~500
    (tests/test_logs.py holds the two equal)."""
    sink = _sink
    if sink is None:  # not configured here: structlog's defaults
        structlog.get_logger("entitlement.rpc").info("rpc", code=code, latency_ms=latency_ms)
        return
    if not _info_on:
        return
    fields: dict[str, Any] = structlog.contextvars.get_contextvars()
    fields.update(code=code, event="rpc", latency_ms=latency_ms, level="info", pid=os.getpid(),
                  timestamp=dt.datetime.now(_UTC).isoformat().replace("+00:00", "Z"))
    sink.write(json.dumps(fields, sort_keys=True, default=repr))


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    if level not in LEVELS:
        raise SystemExit(f"ENTITLEMENT_LOG_LEVEL must be one of {', '.join(LEVELS)}, got {level!r}")
    global _sink, _info_on
    sink = _Sink(stream or sys.stderr)
    _sink, _info_on = sink, LEVELS[level] <= logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
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
