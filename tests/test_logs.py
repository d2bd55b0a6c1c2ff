"""The access log's line is written without structlog's processor chain (entitlement/logs.py `rpc`,
the hot path): it must be the very line structlog would have written, and share its stream
without interleaving."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator

import pytest
import structlog

from entitlement import logs


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """These tests configure logging; the session's servers log to the session's file after."""
    saved, sink = structlog.get_config(), (logs._sink, logs._info_on)
    try:
        yield
    finally:
        structlog.configure(**saved)
        logs._sink, logs._info_on = sink
        structlog.contextvars.clear_contextvars()


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure("info", stream=out)
    structlog.contextvars.clear_contextvars()
    yield out


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("bound", [
    {},
    {"request_id": "0123456789abcdef", "method": "/entitlement.v1.EligibilityService/CheckEligibility"},
    {"request_id": "r-1", "method": "/m", "caller": "adv\u00e9 \"x\"", "role": "advisor", "extra": 12},
])
def test_the_fast_line_is_structlogs_line(stream: io.StringIO, bound: dict[str, object]) -> None:
    structlog.contextvars.bind_contextvars(**bound)
    structlog.get_logger("entitlement.rpc").info("rpc", code="OK", latency_ms=1.25)
    logs.rpc("OK", 1.25)
    slow, fast = stream.getvalue().splitlines()
    a, b = json.loads(slow), json.loads(fast)
    assert a.pop("timestamp")[:16] == b.pop("timestamp")[:16]  # same format, same minute
    assert a == b and a["event"] == "rpc" and a["code"] == "OK"
    # Byte for byte, once the timestamps are set aside: same key order, same separators.
    assert slow.split('"timestamp"')[0] == fast.split('"timestamp"')[0]


def test_no_line_below_the_level() -> None:
    out = io.StringIO()
    logs.configure("warning", stream=out)
    logs.rpc("OK", 1.0)
    structlog.get_logger("x").warning("kept")
    assert [line["event"] for line in _lines(out)] == ["kept"]


def test_concurrent_lines_never_interleave(stream: io.StringIO) -> None:
    def write(i: int) -> None:
        log = structlog.get_logger("t")
        for j in range(300):
            if j % 2:
                logs.rpc(f"C{i}", float(j))
            else:
                log.info("other", n=j, pad="x" * 200)
    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = _lines(stream)  # every line parses: none was cut by another
    assert len(lines) == 6 * 300
    assert sum(line["event"] == "rpc" for line in lines) == 6 * 150
