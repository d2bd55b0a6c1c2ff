"""structlog set-up: one JSON object per line on stderr, with the fields of the call being served
(request id, method, caller, role) bound by the access log and the caller's identity. Log lines carry ids of staff and resources, pseudonyms of job seekers,
never a name, birth date or agency identifier."""

from __future__ import annotations

import codecs
import io
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _add_pid(_logger: object, _name: str, event: dict[str, object]) -> dict[str, object]:
    """Which server process wrote the line (several may share a port: ENTITLEMENT_PROCESSES)."""
    event["pid"] = os.getpid()
    return event


# PostgreSQL's DETAIL line of a constraint violation quotes the row's values ("Key (a, b)=(x, y)
# already exists.", "Failing row contains (...)."): a platform's account id, a request's text. The
# engine hides bound parameters, but the server's own text travels in the exception's message, and
# an exception no handler expected is logged with its traceback (entitlement/api/accesslog.py).
_DETAIL = re.compile(r"(DETAIL:[ \t]*)[^\n]+")  # (anywhere in a line: a message may quote it mid-line)


def _hide_row_values(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop what follows DETAIL: in a rendered traceback (the constraint's name, on the line before,
    says which one failed)."""
    text = event.get("exception")
    if isinstance(text, str) and "DETAIL:" in text:
        event["exception"] = _DETAIL.sub(r"\1(row values not logged)", text)
    return event


class _Sink:
    """The stream every line goes to: one write per line, under one lock, so that lines from
    concurrent calls never interleave (structlog's own lines and `rpc` below alike).

    A plain file stream (stderr, a log file: a text layer over a buffer, or straight over the file
    (stderr under PYTHONUNBUFFERED), over a file descriptor, in an ASCII-compatible encoding) gets
    each line as one `os.write` of its bytes: the text layer's write and flush cost five times as
    much, on every call. The lines are JSON with every
    non-ASCII character escaped, so their bytes are what the text layer would have written. Other
    streams (io.StringIO in tests, anything that transforms what it is given) are written and
    flushed as text."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self._fd = _plain_fd(stream)
        self.dropped = 0  # lines the stream refused (write_line)
        if self._fd is not None:
            stream.flush()  # what the text layer holds goes first

    def write(self, line: str) -> None:
        self.write_line(line + "\n")

    def write_line(self, line: str) -> None:
        """`line` ends with its newline. A line the stream refuses (its disk full, its reader gone:
        OSError; the stream closed: ValueError) is dropped and counted, never raised, as the standard
        library's handlers do (logging.Handler.handleError): a call's line is written after its work,
        a write's COMMIT included, and raised it made the answer an error (UNKNOWN, with the OSError's
        text) although the work was done, and every retry's answer too, its replay's line failing
        alike. (The first drop is told on stderr, if that takes it.)"""
        try:
            self._write_line(line)
        except (OSError, ValueError):
            with self.lock:
                self.dropped += 1
                first = self.dropped == 1
            if first:
                try:
                    sys.stderr.write("entitlement: the log stream refuses lines; they are dropped\n")
                    sys.stderr.flush()
                except (OSError, ValueError, AttributeError):
                    pass

    def _write_line(self, line: str) -> None:
        fd = self._fd
        if fd is None:
            with self.lock:
                self.stream.write(line)
                self.stream.flush()
            return
        data = line.encode("utf-8", "backslashreplace")
        with self.lock:
            if self.stream.closed:  # its descriptor's number may belong to another file by now
                raise ValueError("I/O operation on closed file.")
            written = os.write(fd, data)
            while written < len(data):  # a pipe may take part of a long line at a time
                data = data[written:]
                written = os.write(fd, data)


_ASCII_COMPATIBLE = frozenset({"utf-8", "ascii", "iso8859-1", "iso8859-15", "cp1252"})


def _plain_fd(stream: TextIO) -> int | None:
    """The file descriptor under `stream` when writing bytes there is writing to the stream."""
    buffer = getattr(stream, "buffer", None)
    # Under PYTHONUNBUFFERED (or -u), common in containers, stderr's text layer sits straight on
    # its FileIO (write-through), with no buffer between.
    raw = buffer if isinstance(buffer, io.FileIO) else (
        buffer.raw if isinstance(buffer, (io.BufferedWriter, io.BufferedRandom)) else None)
    if not (isinstance(stream, io.TextIOWrapper) and isinstance(raw, io.FileIO)):
        return None
    try:
        encoding = codecs.lookup(stream.encoding).name
    except LookupError:
        return None
    if encoding not in _ASCII_COMPATIBLE or stream.closed:
        return None
    return raw.fileno()


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
# line it logs. One object in one context variable, set by the access log when the call begins:
# gRPC runs each call in a context of its own, so nothing outlives the call.


class _Call:
    """A call's fields: the four every call has in slots when they are text (None before they are
    known, or when bound to anything but a str: such a value lives in `extra`, with any other
    field bound)."""

    __slots__ = ("method", "request_id", "caller", "role", "extra")

    def __init__(self) -> None:
        self.method: str | None = None
        self.request_id: str | None = None
        self.caller: str | None = None
        self.role: str | None = None
        self.extra: dict[str, Any] | None = None

    def bind(self, key: str, value: Any) -> None:
        """One field, bound again as often as need be: the last value is the one lines carry."""
        if key in _SLOTS and type(value) is str:
            setattr(self, key, value)
            if self.extra is not None and key in self.extra:  # an earlier value that was no str
                del self.extra[key]
                if not self.extra:
                    self.extra = None
            return
        if key in _SLOTS:
            setattr(self, key, None)
        if self.extra is None:
            self.extra = {}
        self.extra[key] = value

    def items(self) -> list[tuple[str, Any]]:
        fields = [(k, getattr(self, k)) for k in ("method", "request_id", "caller", "role")]
        return [(k, v) for k, v in fields if v is not None] + list((self.extra or {}).items())


_SLOTS = frozenset({"method", "request_id", "caller", "role"})
_call: ContextVar[_Call | None] = ContextVar("entitlement_call_fields", default=None)


def begin_call(request_id: str, method: str) -> None:
    """From now on (in this context), every line carries this call's request id and method."""
    call = _Call()
    if type(request_id) is str and type(method) is str:
        call.method, call.request_id = method, request_id
    else:
        call.bind("method", method)
        call.bind("request_id", request_id)
    _call.set(call)


def bind_call(**fields: Any) -> None:
    """Add fields to every further line of the call being served (nothing outside a call)."""
    current = _call.get()
    if current is not None:
        for k, v in fields.items():
            current.bind(k, v)


def bind_caller(caller_id: str, role: str) -> None:
    """`bind_call(caller=caller_id, role=role)` without keyword arguments: the caller's identity,
    bound in every call."""
    current = _call.get()
    if current is None:
        return
    if type(caller_id) is str and type(role) is str and current.extra is None:
        current.caller, current.role = caller_id, role
    else:
        current.bind("caller", caller_id)
        current.bind("role", role)


def _merge_call(_logger: object, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    current = _call.get()
    if current is not None:
        for k, v in current.items():
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


def rpc(code: str, latency_ms: float) -> None:
    """The access log's line for one call (entitlement/api/accesslog.py): the same line as
    `structlog.get_logger().info("rpc", code=code, latency_ms=latency_ms)` with the processors
    below (the call's fields, level, pid, ISO UTC timestamp, JSON with sorted keys), written
    without them: every call writes one, and the processor chain cost a tenth of a check
    (tests/test_logs.py holds the two equal). The parts that repeat from call to call (a caller
    and its code, a method and the process id, a role) are quoted and joined once, in `_PARTS`."""
    sink = _sink
    if sink is None:  # not configured here: structlog's defaults
        structlog.get_logger("entitlement.rpc").info("rpc", code=code, latency_ms=latency_ms)
        return
    if not _info_on:
        return
    call = _call.get()
    if call is None or call.extra is not None or call.method is None or call.request_id is None:
        fields = dict(call.items()) if call is not None else {}
        fields.update(code=code, event="rpc", latency_ms=latency_ms, level="info", pid=os.getpid(),
                      timestamp=timestamp())
        sink.write(_JSON.encode(fields))
        return
    # Sorted keys: caller, code, event, latency_ms, level, method, pid, request_id, role, timestamp.
    caller, method, role = call.caller, call.method, call.role
    head = _PARTS.get((caller, code))
    if head is None:
        head = _part((caller, code), ("{" if caller is None else f'{{"caller": {_str(caller)}, ')
                     + f'"code": {_str(code)}, "event": "rpc", "latency_ms": ')
    middle = _PARTS.get(method)
    if middle is None:
        middle = _part(method, f', "level": "info", "method": {_str(method)}, "pid": {os.getpid()}, ')
    tail = _PARTS.get((role,))
    if tail is None:
        tail = _part((role,), ("" if role is None else f'"role": {_str(role)}, ') + '"timestamp": "')
    sink.write_line(f'{head}{float(latency_ms)!r}{middle}"request_id": {_str(call.request_id)}, {tail}{timestamp()}"}}\n')


_PARTS: dict[object, str] = {}  # see rpc(); keys: (caller, code), method, (role,)


def _part(key: object, text: str) -> str:
    if len(_PARTS) >= 4096:  # bounded: callers and codes are few, but not known in advance
        _PARTS.clear()
    _PARTS[key] = text
    return text


os.register_at_fork(after_in_child=_PARTS.clear)  # the process id is in them


_CYGRPC, _ANSWER_UNSENT = "grpc._cython.cygrpc", "ExecuteBatchError raised in core by servicer method"


class _FromStdlib(logging.Handler):
    """Lines of the standard library's `logging` (SQLAlchemy's pool, grpc, asyncio), from WARNING up,
    as lines of ours (event `stdlib_log`, the logger's name, its message; a traceback through the same
    redaction as ours). Without it they went to Python's last-resort handler: plain text among the
    JSON lines on stderr, and a pool's "Exception during reset" traceback with PostgreSQL's DETAIL
    line, a row's values, in full."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if "DETAIL:" in message:
                message = _DETAIL.sub(r"\1(row values not logged)", message)
            fields: dict[str, Any] = {"logger": record.name, "message": message}
            level = record.levelno
            if record.name == _CYGRPC and message.startswith(_ANSWER_UNSENT):
                # grpc.aio (the event-loop model) logs this at ERROR, with a traceback, when core
                # refuses to send an answer: the call had ended as it was sent (its client's deadline
                # passed, or it cancelled; grpc/grpc#32551). The access log already says how the
                # call ended; an ERROR line per late client would wake whoever alerts on errors.
                level, fields["note"] = logging.WARNING, "the call had ended as its answer was sent"
            elif record.exc_info:
                fields["exc_info"] = record.exc_info
            structlog.get_logger("entitlement.stdlib").log(level, "stdlib_log", **fields)
        except Exception:  # noqa: BLE001 - logging's own convention: never raise from a handler
            self.handleError(record)


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    if level not in LEVELS:
        raise SystemExit(f"ENTITLEMENT_LOG_LEVEL must be one of {', '.join(LEVELS)}, got {level!r}")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _FromStdlib)]:
        root.removeHandler(handler)
    root.addHandler(_FromStdlib())
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
            _hide_row_values,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *_args: _LineLogger(sink),
        # Loggers are cached for speed, except when a stream is given (tests reconfigure per server).
        cache_logger_on_first_use=stream is None,
    )
