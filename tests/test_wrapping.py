"""The wrapping of every method (entitlement/api/wrapping.py), over a real gRPC channel: a behaviour
that defines only `scope` (the default `around_unary`) runs around unary and streaming calls alike,
the first behaviour outermost, with the call's metadata and its deadline bound; an undecodable
request is refused inside every behaviour; a handler's exception passes through each scope's exit,
innermost first. The production behaviours (access log, identity, rate limit) override
`around_unary` with the same work done in one function per call: the other tests of the suite run
them through the real server (their errors, their log lines, their refusals)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2

from entitlement import deadline
from entitlement.api.wrapping import BehaviorInterceptor, wrap_handler

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
        events.append(f"handler {request.value} deadline={'none' if left is None else round(left)}")
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
    assert events == ["outer enter Unary t1", "inner enter Unary t1", "handler abc deadline=30",
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
    assert events == ["outer enter Unary -", "inner enter Unary -", "handler boom deadline=30",
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
    assert deadline.remaining() is None  # and nothing leaked into this (the client's) context
