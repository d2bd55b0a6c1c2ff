"""The event-loop model's server streams (entitlement/aio_server.py `_offload`): a sync response
iterator runs in a pool thread and hands its responses to the loop through a buffer of
STREAM_BUFFER. Served here by a real grpc.aio server on a loop thread of its own, to a real
channel, with a method of our own that counts what it made (the production methods' streams, a
funder's event log or a platform's changes, read the database: their progress cannot be counted
from outside): a client that stops reading must stop the thread (it may not read the whole stream
ahead into memory), and a client that goes away must end it (its `finally` runs, its thread is
given back)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from entitlement.aio_server import STREAM_BUFFER, _offload, new_event_loop
from entitlement.config import ASYNCIO, UVLOOP

MESSAGE = b"x" * 32 * 1024  # 32 KiB: gRPC's flow-control window holds only a few
TOTAL = 2000  # 64 MiB in all: far more than any transport buffer
# gRPC grows its flow-control windows with the bandwidth it measures (BDP probing: several MiB on
# a loopback, a hundred messages here, varying by run); off, they stay at their defaults, and what
# the transport can hold besides our buffer is a few messages.
FIXED_WINDOWS = [("grpc.http2.bdp_probe", 0)]


class Produced:
    def __init__(self) -> None:
        self.made = 0
        self.closed = threading.Event()

    def method(self, _request: Any, _context: Any) -> Iterator[bytes]:
        try:
            for _ in range(TOTAL):
                self.made += 1
                yield MESSAGE
        finally:
            self.closed.set()


@pytest.fixture(params=[UVLOOP, ASYNCIO])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[grpc.Channel, Produced]]:
    """The streaming method served by a grpc.aio server on each of the event-loop model's loops."""
    produced = Produced()
    pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-test")
    loop = new_event_loop(request.param)
    thread = threading.Thread(target=loop.run_forever, name="stream-test-loop", daemon=True)
    thread.start()

    async def open_server() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=FIXED_WINDOWS)
        handler = grpc.unary_stream_rpc_method_handler(_offload(produced.method, pool, False, True))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Stream", {"Go": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(open_server(), loop).result(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=FIXED_WINDOWS)
    try:
        yield channel, produced
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        pool.shutdown(wait=True, cancel_futures=True)


def _settled(produced: Produced, seconds: float = 1.0) -> int:
    """What the method made once it has stopped making more (waits until a second passes without a
    new response, at most 10 s)."""
    end = time.monotonic() + 10
    last = -1
    while time.monotonic() < end and produced.made != last:
        last = produced.made
        time.sleep(seconds)
    return produced.made


def test_a_client_that_stops_reading_stops_the_method(served: tuple[grpc.Channel, Produced]) -> None:
    channel, produced = served
    responses = channel.unary_stream("/test.Stream/Go")(b"", timeout=60)
    assert next(responses) == MESSAGE
    made = _settled(produced)
    # The buffer, plus what gRPC's transport holds (measured: 4 or 5 messages of 32 KiB in its
    # default flow-control windows) and the one the loop is writing: far from the whole stream.
    assert STREAM_BUFFER < made <= STREAM_BUFFER + 16, made
    # Reading on lets it go on, and the whole stream arrives, complete.
    assert sum(1 for _ in responses) == TOTAL - 1
    assert produced.made == TOTAL
    assert produced.closed.wait(10)


def test_a_client_that_goes_away_ends_the_method(served: tuple[grpc.Channel, Produced]) -> None:
    channel, produced = served
    responses = channel.unary_stream("/test.Stream/Go")(b"", timeout=60)
    assert next(responses) == MESSAGE
    made = _settled(produced)
    assert not produced.closed.is_set()  # waiting on the buffer, with its stream still open
    responses.cancel()
    # The method's thread stops waiting for buffer room and closes the iterator: its `finally`
    # runs (a production method's access log line, its database session) and nothing more is made.
    assert produced.closed.wait(10)
    assert produced.made <= made + 1
    # Its only thread is free again: a second call is served.
    again = channel.unary_stream("/test.Stream/Go")(b"", timeout=60)
    assert next(again) == MESSAGE
    again.cancel()
