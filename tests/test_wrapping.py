"""The wrapping of every method (entitlement/api/wrapping.py), over a real gRPC channel: a behaviour
that defines only `scope` (the default `around_unary`) runs around unary and streaming calls alike,
the first behaviour outermost, with the call's metadata and its deadline bound; an undecodable
request is refused inside every behaviour; a handler's exception passes through each scope's exit,
innermost first. The production behaviours (access log, identity, rate limit) override
`around_unary` with the same work done in one function per call: here around a handler of our own
at our methods' paths, in both server models (the event-loop one answering on its loop or in its
pool, through its context adapters), every outcome (answered, refused, domain error, outage, a
wait cut by the deadline, the handler's own abort, an unexpected error) gives its status, its
reason and one access line that says that status. (What a behaviour binds for its call, it resets when the call ends; gRPC runs each call in a
context of its own in both server models, so nothing could outlive the call anyway: checked, a
missing reset shows in no later call.)"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import asyncio
import datetime as dt
import threading
import uuid
from pathlib import Path
from typing import TextIO

import grpc
import pytest
from google.protobuf import wrappers_pb2
from sqlalchemy.exc import OperationalError

from support import failure, log_records

from entitlement import aio_server, deadline
from entitlement.api.accesslog import AccessLogInterceptor
from entitlement.api.identity import CallerInterceptor, _caller
from entitlement.api.ratelimit import RateLimitInterceptor, TokenBuckets
from entitlement.api.wrapping import BehaviorInterceptor, wrap_handler
from entitlement.callers import Caller, CallerDirectory, Directory, write_callers
from entitlement.errors import DeadlineExceeded, NotFound

SERVICE = "test.Wrapped"


class Recording(BehaviorInterceptor):
    """A behaviour defined by its scope alone, noting what it sees."""

    def __init__(self, name: str, events: list[str]) -> None:
        self.name, self.events = name, events

    def scope(self, method: str, metadata: tuple[Any, ...] | None,
              context: grpc.ServicerContext) -> AbstractContextManager[None]:
        tag = dict(metadata or ()).get("x-tag", "-")
        return self._scope(method.rsplit("/", 1)[-1], tag)

    @contextmanager
    def _scope(self, method: str, tag: str) -> Iterator[None]:
        self.events.append(f"{self.name} enter {method} {tag}")
        try:
            yield
        except Exception as exc:
            self.events.append(f"{self.name} saw {type(exc).__name__}")
            raise
        finally:
            self.events.append(f"{self.name} exit")


@pytest.fixture()
def served() -> Iterator[tuple[grpc.Channel, list[str]]]:
    events: list[str] = []
    behaviors = [Recording("outer", events), Recording("inner", events)]

    def unary(request: wrappers_pb2.StringValue, context: grpc.ServicerContext) -> wrappers_pb2.StringValue:
        left = deadline.remaining()
        # About the client's 30 s (gRPC may round the timeout it sends up: 30.1 s seen).
        events.append(f"handler {request.value} deadline={'none' if left is None else 'set' if 20 < left < 40 else left}")
        if request.value == "boom":
            raise ValueError("boom")
        return wrappers_pb2.StringValue(value=request.value.upper())

    def stream(request: wrappers_pb2.StringValue, context: grpc.ServicerContext) -> Iterator[wrappers_pb2.StringValue]:
        events.append(f"handler {request.value} in_call={deadline.in_call()}")
        for c in request.value:
            yield wrappers_pb2.StringValue(value=c)

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=wrappers_pb2.StringValue.FromString,
            response_serializer=wrappers_pb2.StringValue.SerializeToString),
        "Stream": grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=wrappers_pb2.StringValue.FromString,
            response_serializer=wrappers_pb2.StringValue.SerializeToString),
    }
    wrapped = {name: wrap_handler(h, f"/{SERVICE}/{name}", behaviors) for name, h in handlers.items()}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, wrapped),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, events
    finally:
        channel.close()
        server.stop(None)


def _unary(channel: grpc.Channel) -> Any:
    return channel.unary_unary(f"/{SERVICE}/Unary", request_serializer=lambda b: b, response_deserializer=lambda b: b)


def test_a_scope_only_behaviour_runs_around_a_unary_call_in_order(served: tuple[grpc.Channel, list[str]]) -> None:
    channel, events = served
    answer = _unary(channel)(wrappers_pb2.StringValue(value="abc").SerializeToString(),
                             metadata=(("x-tag", "t1"),), timeout=30)
    assert wrappers_pb2.StringValue.FromString(answer).value == "ABC"
    assert events == ["outer enter Unary t1", "inner enter Unary t1", "handler abc deadline=set",
                      "inner exit", "outer exit"]


def test_a_scope_only_behaviour_runs_around_a_streaming_call(served: tuple[grpc.Channel, list[str]]) -> None:
    channel, events = served
    call = channel.unary_stream(f"/{SERVICE}/Stream", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    got = [wrappers_pb2.StringValue.FromString(b).value
           for b in call(wrappers_pb2.StringValue(value="xy").SerializeToString(), metadata=(("x-tag", "t2"),), timeout=30)]
    assert got == ["x", "y"]
    assert events == ["outer enter Stream t2", "inner enter Stream t2", "handler xy in_call=True",
                      "inner exit", "outer exit"]


def test_an_exception_passes_through_every_scope_innermost_first(served: tuple[grpc.Channel, list[str]]) -> None:
    channel, events = served
    with pytest.raises(grpc.RpcError) as info:
        _unary(channel)(wrappers_pb2.StringValue(value="boom").SerializeToString(), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNKNOWN  # no access log here to map it
    assert events == ["outer enter Unary -", "inner enter Unary -", "handler boom deadline=set",
                      "inner saw ValueError", "inner exit", "outer saw ValueError", "outer exit"]


def test_an_undecodable_request_is_refused_inside_every_scope(served: tuple[grpc.Channel, list[str]]) -> None:
    channel, events = served
    with pytest.raises(grpc.RpcError):
        _unary(channel)(b"\xff\xff\xff", timeout=30)  # no valid StringValue: a truncated varint tag
    assert events == ["outer enter Unary -", "inner enter Unary -", "inner saw InvalidArgument", "inner exit",
                      "outer saw InvalidArgument", "outer exit"]


def test_no_deadline_is_bound_when_the_client_sets_none(served: tuple[grpc.Channel, list[str]]) -> None:
    channel, events = served
    _unary(channel)(wrappers_pb2.StringValue(value="q").SerializeToString())
    assert "handler q deadline=none" in events


# ------------------------------------------------------------------- the production behaviours

CHECK = "/entitlement.v1.EligibilityService/CheckEligibility"  # advisors may call it
ACTIVATE = "/entitlement.v1.ActivationService/ActivateEntitlement"  # advisors too; rate limited here
VERIFY = "/entitlement.v1.ActivationService/VerifyEntitlement"  # platforms only


class Edge:
    def __init__(self, channel: grpc.Channel, tokens: dict[str, str], outages: list[int], log_path: Path) -> None:
        self.channel, self.tokens, self.outages, self.log_path = channel, tokens, outages, log_path

    def call(self, method: str, body: bytes, caller: str | None = "t-advisor") -> tuple[str, bytes | grpc.RpcError]:
        rid = "wrap-" + uuid.uuid4().hex
        md = [("x-request-id", rid)] + ([("authorization", "Bearer " + self.tokens[caller])] if caller else [])
        try:
            answer: bytes | grpc.RpcError = self.channel.unary_unary(method)(body, metadata=md, timeout=30)
        except grpc.RpcError as err:
            answer = err
        return rid, answer

    def lines(self, rid: str) -> list[dict[str, Any]]:
        return [x for x in log_records(self.log_path) if x.get("request_id") == rid]


def _handler(request: bytes, context: grpc.ServicerContext) -> bytes:
    what = request.decode()
    if what == "boom":
        raise ValueError("boom: SELECT secret FROM activations")  # (never shown to the caller)
    if what == "missing":
        raise NotFound("no such thing", reason="TEST_NOT_FOUND")
    if what == "outage":
        raise OperationalError("SELECT 1", None, RuntimeError("server closed the connection"))
    if what == "lock-wait":
        err = DeadlineExceeded("the deadline passed while waiting for a lock")
        err.database_wait = True
        raise err
    if what == "own-abort":
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the handler's own status")
    caller = _caller.get()
    return f"{caller.id if caller else None} deadline={deadline.in_call()}".encode()


@contextmanager
def _threads(behaviors: list[BehaviorInterceptor]) -> Iterator[int]:
    """Our methods' paths on the thread-pool server, wrapped as server_main wraps them."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    for path in (CHECK, ACTIVATE, VERIFY):
        service, name = path[1:].split("/")
        handler = wrap_handler(grpc.unary_unary_rpc_method_handler(_handler), path, behaviors)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {name: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


@contextmanager
def _event_loop(behaviors: list[BehaviorInterceptor], inline: frozenset[str]) -> Iterator[int]:
    """The same on the event-loop server, registered as entitlement/aio_server.py registers ours:
    the methods named in `inline` answered on the loop (InlineContext), the others in a pool
    (SyncContext)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    pool = futures.ThreadPoolExecutor(max_workers=2)
    table = aio_server._MethodTable()
    registrar = aio_server._AioRegistrar(table, behaviors, pool, pool, inline)
    for path in (CHECK, ACTIVATE, VERIFY):
        service, name = path[1:].split("/")
        registrar.add_registered_method_handlers(service, {name: grpc.unary_unary_rpc_method_handler(_handler)})

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((table,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port
    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        pool.shutdown()


@pytest.fixture(params=["threads", "event-loop, on the loop", "event-loop, in its pool"])
def edge(request: pytest.FixtureRequest, tmp_path: Path, server_log: tuple[Path, TextIO]) -> Iterator[Edge]:
    log_path, _ = server_log
    tokens = write_callers(tmp_path / "callers.json", [
        Caller(id="t-advisor", role="advisor", advisor_id="A1", agency_code="75011"),
        Caller(id="t-platform", role="platform", platform_id="openclassrooms")])
    callers = Directory(CallerDirectory.load(tmp_path / "callers.json"), None,
                        lambda: dt.datetime.now(dt.timezone.utc))
    outages: list[int] = []
    behaviors: list[BehaviorInterceptor] = [
        AccessLogInterceptor(on_outage=lambda: outages.append(1)),
        CallerInterceptor(callers, client_certificates=False),
        RateLimitInterceptor(TokenBuckets(1, 1), methods=frozenset({ACTIVATE}))]
    served = (_threads(behaviors) if request.param == "threads" else
              _event_loop(behaviors, frozenset({"CheckEligibility", "VerifyEntitlement", "ActivateEntitlement"})
                          if request.param.endswith("loop") else frozenset()))
    with served as port:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield Edge(channel, tokens, outages, log_path)
        finally:
            channel.close()


@pytest.mark.parametrize(("body", "caller", "method", "code", "reason", "outages"), [
    ("ok", "t-advisor", CHECK, "OK", None, 0),
    ("ok", None, CHECK, "UNAUTHENTICATED", "CREDENTIALS_MISSING", 0),
    ("ok", "t-advisor", VERIFY, "PERMISSION_DENIED", "ROLE_NOT_ALLOWED", 0),
    ("missing", "t-advisor", CHECK, "NOT_FOUND", "TEST_NOT_FOUND", 0),
    ("outage", "t-advisor", CHECK, "UNAVAILABLE", "DATABASE_UNAVAILABLE", 1),
    ("lock-wait", "t-advisor", CHECK, "DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", 1),
    ("own-abort", "t-advisor", CHECK, "FAILED_PRECONDITION", None, 0),
    ("boom", "t-advisor", CHECK, "INTERNAL", "INTERNAL", 0),
])
def test_each_outcome_of_the_production_edge(edge: Edge, body: str, caller: str | None, method: str, code: str,
                                             reason: str | None, outages: int) -> None:
    rid, answer = edge.call(method, body.encode(), caller)
    if code == "OK":
        assert answer == b"t-advisor deadline=True"
    else:
        assert isinstance(answer, grpc.RpcError) and answer.code().name == code, answer
        if reason is not None:
            f = failure(answer)
            assert f.reason == reason and f.metadata.get("request_id") in (rid, None), f
        if code == "INTERNAL":
            assert "select" not in (answer.details() or "").lower() and rid in (answer.details() or "")
    lines = edge.lines(rid)
    rpc = [x for x in lines if x["event"] == "rpc"]
    assert len(rpc) == 1 and rpc[0]["code"] == code, lines  # (a handler's own abort: its code too)
    assert rpc[0]["method"] == method and isinstance(rpc[0]["latency_ms"], float)
    if caller is not None:
        assert rpc[0]["caller"] == caller  # bound before the role check: a refused caller is named
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        assert [x["event"] for x in lines] == ["access_refused", "rpc"]
    if code == "INTERNAL":
        assert [x["event"] for x in lines] == ["unhandled_exception", "rpc"]
    assert len(edge.outages) == outages


def test_the_rate_limit_refuses_after_the_caller_is_known(edge: Edge) -> None:
    rid1, first = edge.call(ACTIVATE, b"ok")
    rid2, second = edge.call(ACTIVATE, b"ok")
    assert first == b"t-advisor deadline=True"
    assert isinstance(second, grpc.RpcError) and second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failure(second).metadata["limit_per_minute"] == "1"
    assert [x["code"] for x in edge.lines(rid2) if x["event"] == "rpc"] == ["RESOURCE_EXHAUSTED"]
    _, other = edge.call(CHECK, b"ok")  # another method: not limited
    assert other == b"t-advisor deadline=True"
