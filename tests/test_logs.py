"""The access log's line is written without structlog's processor chain (entitlement/logs.py `rpc`,
the hot path): it must be the very line structlog would have written, and share its stream
without interleaving."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest
import structlog

from entitlement import logs


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """These tests configure logging, in a context of their own (as gRPC runs each call); the
    session's servers log to the session's file after."""
    saved, sink = structlog.get_config(), (logs._sink, logs._info_on)
    token = logs._call.set(None)
    try:
        yield
    finally:
        logs._call.reset(token)
        structlog.configure(**saved)
        logs._sink, logs._info_on = sink


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure("info", stream=out)
    yield out


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("call", [
    None,  # outside any call
    {"request_id": "0123456789abcdef", "method": "/entitlement.v1.EligibilityService/CheckEligibility"},
    {"request_id": "r-1", "method": "/m", "caller": "adv\u00e9 \"x\"\n", "role": "advisor"},
    {"request_id": "r-2", "method": "/m", "caller": "c", "role": "funder", "extra": 12},  # not the usual fields
])
@pytest.mark.parametrize("latency", [1.25, 0.001, 1234.5, 3.0])
def test_the_fast_line_is_structlogs_line(stream: io.StringIO, call: dict[str, object] | None,
                                          latency: float) -> None:
    if call is not None:
        logs.begin_call(str(call["request_id"]), str(call["method"]))
        logs.bind_call(**{k: v for k, v in call.items() if k not in ("request_id", "method")})
    structlog.get_logger("entitlement.rpc").info("rpc", code="OK", latency_ms=latency)
    logs.rpc("OK", latency)
    slow, fast = stream.getvalue().splitlines()
    a, b = json.loads(slow), json.loads(fast)
    assert a.pop("timestamp")[:16] == b.pop("timestamp")[:16]  # same format, same minute
    assert a == b and a["event"] == "rpc" and a["code"] == "OK"
    assert (a.get("caller"), a.get("request_id")) == ((call or {}).get("caller"), (call or {}).get("request_id"))
    # Byte for byte, once the timestamps are set aside: same key order, same separators, escapes.
    assert slow.split('"timestamp"')[0] == fast.split('"timestamp"')[0]


def test_timestamps_are_structlogs_format() -> None:
    import calendar
    import re
    import time
    for _ in range(50):
        stamp = logs.timestamp()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp), stamp
        assert abs(calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.time()) < 2
        time.sleep(0.01)


def test_a_line_logged_during_a_call_carries_its_fields(stream: io.StringIO) -> None:
    logs.begin_call("rid-123", "/entitlement.v1.X/Y")
    logs.bind_call(caller="c1", role="advisor")
    structlog.get_logger("t").warning("something", caller="explicit wins")
    [line] = _lines(stream)
    assert line["request_id"] == "rid-123" and line["method"] == "/entitlement.v1.X/Y"
    assert line["role"] == "advisor" and line["caller"] == "explicit wins"


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


def test_lines_to_a_file_descriptor_are_whole_and_in_order(tmp_path: object) -> None:
    """A stream with a file descriptor (stderr, a log file) gets each line as one write of its bytes
    (logs._Sink): what the stream held before comes first, concurrent lines never cut each other,
    and a line longer than a pipe holds arrives whole."""
    import os
    from pathlib import Path
    path = Path(str(tmp_path)) / "log.jsonl"
    with path.open("w") as out:
        out.write('{"event": "before"}\n')  # still in the text layer's buffer
        logs.configure("info", stream=out)

        def write(i: int) -> None:
            for j in range(200):
                logs.begin_call(f"rid-{i}-{j}", "/m")
                logs.bind_caller(f"caller-{i}", "advisor")
                logs.rpc("OK", float(j))
        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"event": "before"} and len(lines) == 1 + 4 * 200
    for i in range(4):  # each thread's lines in its order, with its fields
        mine = [line for line in lines[1:] if line["caller"] == f"caller-{i}"]
        assert [line["request_id"] for line in mine] == [f"rid-{i}-{j}" for j in range(200)]
        assert {line["pid"] for line in mine} == {os.getpid()}

    read_fd, write_fd = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 65536), b"")))
    reader.start()
    with os.fdopen(write_fd, "w") as pipe:
        logs.configure("info", stream=pipe)
        structlog.get_logger("t").info("long", pad="é" * 200_000)  # 1.2 MB once escaped: many pipe-fulls
    reader.join()
    os.close(read_fd)
    [line] = b"".join(chunks).decode().splitlines()
    assert json.loads(line)["pad"] == "é" * 200_000


def test_a_caller_bound_as_anything_but_text_takes_the_general_line(stream: io.StringIO) -> None:
    logs.begin_call("rid-1", "/m")
    logs.bind_caller("c1", None)  # type: ignore[arg-type]
    logs.rpc("OK", 1.5)
    [line] = _lines(stream)
    assert line["caller"] == "c1" and line["role"] is None and line["latency_ms"] == 1.5


def test_a_field_bound_again_carries_its_last_value_in_both_lines(stream: io.StringIO) -> None:
    """A call field first bound to something that is not text, then to text (or the other way
    round), shows its last value in the access line and in structlog's lines alike."""
    logs.begin_call("rid-1", "/m")
    logs.bind_call(caller=1, role=None)
    logs.bind_caller("c1", "advisor")
    structlog.get_logger("t").info("other")
    logs.rpc("OK", 1.0)
    logs.bind_call(caller=2)
    logs.rpc("OK", 2.0)
    first, access, again = _lines(stream)
    assert (first["caller"], first["role"]) == (access["caller"], access["role"]) == ("c1", "advisor")
    assert again["caller"] == 2 and again["role"] == "advisor"


def test_only_plain_file_streams_are_written_through_their_descriptor(tmp_path: object) -> None:
    import gzip
    import os
    from pathlib import Path
    base = Path(str(tmp_path))
    with (base / "plain.log").open("w") as plain:
        assert logs._plain_fd(plain) == plain.fileno()
    # stderr under PYTHONUNBUFFERED / -u: the text layer straight over the file, no buffer between.
    unbuffered = io.TextIOWrapper(io.FileIO(base / "unbuffered.log", "w"), encoding="utf-8", write_through=True)
    unbuffered.write("before ")  # what the text layer was given before goes first
    assert logs._plain_fd(unbuffered) == unbuffered.fileno()
    logs.configure("info", stream=unbuffered)
    logs.begin_call("rid-unbuffered", "/m")
    logs.rpc("OK", 1.25)
    logs.configure("info", stream=io.StringIO())
    unbuffered.close()
    head, line = (base / "unbuffered.log").read_text().split(" ", 1)
    assert head == "before" and json.loads(line)["request_id"] == "rid-unbuffered"
    for transforming in (io.TextIOWrapper(io.BytesIO()), (base / "wide.log").open("w", encoding="utf-16"),
                         io.TextIOWrapper(gzip.open(base / "z.gz", "wb")), io.StringIO()):
        assert logs._plain_fd(transforming) is None, transforming  # written as text, as before
        transforming.close()
    with gzip.open(base / "z2.gz", "wt") as zipped:
        logs.configure("info", stream=zipped)
        logs.rpc("OK", 1.0)
    assert json.loads(gzip.open(base / "z2.gz", "rt").read())["event"] == "rpc"  # compressed, not raw bytes
    # A closed stream refuses the line (its descriptor's number may be another file's by now): the
    # line is dropped and counted, never raised (a call's line comes after its work:
    # tests/test_write_failures.py).
    closed = (base / "closed.log").open("w")
    logs.configure("info", stream=closed)
    closed.close()
    other = os.open(base / "other.log", os.O_WRONLY | os.O_CREAT)  # likely takes the freed number
    try:
        logs.rpc("OK", 1.0)
    finally:
        os.close(other)
    assert (base / "other.log").read_text() == ""
    assert logs._sink is not None and logs._sink.dropped == 1


def test_the_standard_librarys_logging_comes_out_as_our_lines_redacted(stream: io.StringIO,
                                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """SQLAlchemy's pool, grpc and asyncio log through `logging`: their lines come out as ours (JSON,
    one per line, to the same stream), a traceback through the same redaction of row values."""
    pool = logging.getLogger("sqlalchemy.pool.impl.QueuePool")
    try:
        raise RuntimeError('duplicate key value violates unique constraint "uq_account"\n'
                           "DETAIL:  Key (account_id)=(alice-account-42) already exists.")
    except RuntimeError:
        pool.error("Exception during reset or similar", exc_info=True)
    logging.getLogger("grpc._server").warning("cannot do %s: %s", "that", "DETAIL:  Failing row contains (bob-7).")
    logging.getLogger("asyncio").info("below WARNING: not logged")
    lines = _lines(stream)
    assert [(x["event"], x["logger"], x["level"]) for x in lines] == [
        ("stdlib_log", "sqlalchemy.pool.impl.QueuePool", "error"), ("stdlib_log", "grpc._server", "warning")]
    assert lines[0]["message"] == "Exception during reset or similar"
    assert "RuntimeError" in lines[0]["exception"] and "uq_account" in lines[0]["exception"]
    assert lines[1]["message"] == "cannot do that: DETAIL:  (row values not logged)"
    text = stream.getvalue()
    assert "alice-account-42" not in text and "bob-7" not in text
    out, err = capfd.readouterr()
    assert "Exception during reset" not in out + err  # (Python's last-resort handler wrote it to stderr)


def test_an_answer_grpc_could_not_send_to_a_client_gone_is_a_warning_without_traceback(stream: io.StringIO) -> None:
    """grpc.aio logs "ExecuteBatchError raised in core by servicer method [...]" at ERROR with a
    traceback when a call ended (its client's deadline, a cancel) just as its answer was sent (seen
    by the review of the event-loop model; grpc/grpc#32551): a WARNING line of ours, no traceback.
    Any other ERROR of the same logger stays an ERROR with its traceback."""
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    for text in ("ExecuteBatchError raised in core by servicer method [/entitlement.v1.EligibilityService/"
                 "CheckEligibility]", "Unexpected [RuntimeError] raised by servicer method [/x/Y]"):
        try:
            raise RuntimeError("core said no")
        except RuntimeError:
            cygrpc.error(text, exc_info=True)
    late, other = _lines(stream)
    assert (late["level"], late["logger"], late["note"]) == (
        "warning", "grpc._cython.cygrpc", "the call had ended as its answer was sent"), late
    assert "exception" not in late and late["message"].endswith("CheckEligibility]")
    assert other["level"] == "error" and "core said no" in other["exception"] and "note" not in other
