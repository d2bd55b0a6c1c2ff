"""Behaviours that run around every call of our services (identity, access log and error mapping,
rate limit), written once for every RPC shape (unary or streaming).

They are applied by wrapping each method's handler ONCE, when the services are registered
(`WrappingRegistrar`; entitlement/aio_server.py does the same for the event-loop server), not as gRPC server
interceptors: a server interceptor runs on every call and builds a new method handler each time,
which on the hot path cost more than a registry lookup.

It also decodes requests itself: bytes that are no valid message of the request type (corrupt or
truncated wire format, invalid UTF-8 in a string) would make gRPC answer a bare INTERNAL
("Exception deserializing request!") before any of our code runs. Here they become a marker that
the innermost wrapper turns into INVALID_ARGUMENT, inside every behaviour's scope: the call is
logged, authenticated and authorized like any other before its body is refused.

Every call also runs with its deadline bound for the storage layer (entitlement/deadline.py; bound
outermost, so that the caller's own lookup keeps to it too), and a client stream that ends because
the client gave up (cancelled, deadline passed) becomes CANCELLED or DEADLINE_EXCEEDED instead of
an unexpected error (gRPC raises a bare RpcError from the request iterator) or, worse, a stream
taken for whole (gRPC may end a cancelled call's request stream as a finished one: its end waits up
to STREAM_END_SETTLE_S for the cancellation to show)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import AbstractContextManager
from typing import Any

import grpc

from entitlement import deadline
from entitlement.errors import Cancelled, InvalidArgument


class Undecodable:
    """A request whose bytes did not decode."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def refuse(self) -> InvalidArgument:
        # The empty field path: the request as a whole (its bytes are never echoed back).
        return InvalidArgument.single("", f"the request is not a valid {self.type_name} message "
                                          "(protobuf wire format)")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None or getattr(deserializer, "tolerant", False):
        return deserializer
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "request")

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, and anything a deserializer may raise on foreign bytes
            return Undecodable(type_name)
    decode.tolerant = True  # type: ignore[attr-defined]
    return decode


def _checked(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise request.refuse()
    return request


STREAM_END_SETTLE_S = 0.05  # how long a client stream's end waits for a cancellation to show


def _client_gone() -> Exception:
    return (deadline.exceeded() if deadline.expired() else
            Cancelled("the client cancelled the call while sending its requests; nothing was committed"))


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    it = iter(requests)
    while True:
        try:
            request = next(it)
        except StopIteration:
            # A cancelled call's stream may end as a finished one (gRPC, both server models, when
            # the cancellation is seen a moment after the stream's end): a cut-off stream must
            # never be taken for a whole one (an import of half a file). Once per stream.
            if deadline.over(STREAM_END_SETTLE_S):
                raise _client_gone() from None
            return
        except grpc.RpcError:  # gRPC ends the request stream so when the client is gone
            raise _client_gone() from None
        yield _checked(request)


def _call_deadline(context: grpc.ServicerContext) -> AbstractContextManager[None]:
    return deadline.bound(context.time_remaining(), context.is_active)


Handler = Callable[[Any, grpc.ServicerContext], Any]


class BehaviorInterceptor:
    """A behaviour run around every call of the methods it applies to (see wrap_handler)."""

    def scope(self, method: str, metadata: tuple[Any, ...] | None,
              context: grpc.ServicerContext) -> AbstractContextManager[None]:
        """The context every call of `method` runs in (override)."""
        raise NotImplementedError

    def applies_to(self, method: str) -> bool:
        """Whether calls of `method` run in this behaviour's scope at all (override to skip)."""
        return True

    def around_unary(self, fn: Handler, method: str) -> Handler:
        """`fn`, a handler with one response, run in this behaviour's scope at each call. The
        behaviours of every call (access log, identity, rate limit) override it with the same work
        as their `scope` done in this one function: no context manager made, entered and left per
        call (four Python calls a behaviour, on the path of every read)."""
        scope = self.scope

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            with scope(method, context.invocation_metadata(), context):
                return fn(request, context)
        return unary


def _scoped(fn: Handler, method: str, behavior: BehaviorInterceptor, streaming_response: bool) -> Handler:
    if not streaming_response:
        return behavior.around_unary(fn, method)
    scope = behavior.scope

    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with scope(method, context.invocation_metadata(), context):
            yield from fn(request, context)
    return stream


def _innermost(fn: Callable[[Any, grpc.ServicerContext], Any], streaming_request: bool,
               streaming_response: bool) -> Callable[[Any, grpc.ServicerContext], Any]:
    """The handler, given decoded requests only (an undecodable one is refused here, after every
    behaviour: the call is logged and its caller checked first)."""
    check = _checked_stream if streaming_request else _checked
    if streaming_response:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            yield from fn(check(request), context)
        return stream

    if streaming_request:
        def client_stream(requests: Any, context: grpc.ServicerContext) -> Any:
            return fn(check(requests), context)
        return client_stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if request.__class__ is Undecodable:  # _checked, inline (every unary call)
            raise request.refuse()
        return fn(request, context)
    return unary


def _outermost(fn: Callable[[Any, grpc.ServicerContext], Any],
               streaming_response: bool) -> Callable[[Any, grpc.ServicerContext], Any]:
    """The whole call, behaviours included, keeps to the caller's deadline (entitlement/deadline.py)."""
    if streaming_response:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with _call_deadline(context):
                yield from fn(request, context)
        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        bound = deadline.enter(context.time_remaining(), context.is_active)  # _call_deadline, inline
        try:
            return fn(request, context)
        finally:
            deadline.leave(bound)
    return unary


def passthrough(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """`serializer`, except that a response already serialized (bytes) is sent as it is: a hot
    method may answer with bytes it keeps (CheckEligibility: entitlement.api.convert.check_answer)."""
    if serializer is None or getattr(serializer, "passthrough", False):
        return serializer

    def serialize(response: Any) -> bytes:
        return response if response.__class__ is bytes else serializer(response)
    serialize.passthrough = True  # type: ignore[attr-defined]
    return serialize


def wrap_handler(handler: grpc.RpcMethodHandler, method: str, behaviors: Sequence[BehaviorInterceptor],
                 stream_pool: futures.ThreadPoolExecutor | None = None) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour run inside each of `behaviors`' scopes (the first outermost), its
    requests decoded tolerantly (see the module docstring), the call's deadline bound, and its
    responses sent as they are when already serialized (`passthrough`). A method that streams
    (requests or responses) runs on `stream_pool` when one is given (gRPC's per-method
    `experimental_thread_pool`): such calls hold their thread while they last, and the server's
    own pool stays small for the unary calls (see entitlement/server_main.py)."""
    kw = {"request_deserializer": _tolerant(handler.request_deserializer),
          "response_serializer": passthrough(handler.response_serializer)}
    for make, fn, streaming_request, streaming_response in (
            (grpc.unary_unary_rpc_method_handler, handler.unary_unary, False, False),
            (grpc.unary_stream_rpc_method_handler, handler.unary_stream, False, True),
            (grpc.stream_unary_rpc_method_handler, handler.stream_unary, True, False),
            (grpc.stream_stream_rpc_method_handler, handler.stream_stream, True, True)):
        if fn is not None:
            fn = _innermost(fn, streaming_request, streaming_response)
            for behavior in reversed([b for b in behaviors if b.applies_to(method)]):
                fn = _scoped(fn, method, behavior, streaming_response)
            fn = _outermost(fn, streaming_response)
            if stream_pool is not None and (streaming_request or streaming_response):
                fn.experimental_thread_pool = stream_pool  # type: ignore[attr-defined]
            return make(fn, **kw)
    raise ValueError(f"{method}: a method handler with no behaviour")


class WrappingRegistrar:
    """Stands in for the server in the generated `add_*Servicer_to_server` functions: registers
    each method's handler wrapped once in `behaviors` (see the module docstring)."""

    def __init__(self, server: grpc.Server, behaviors: Sequence[BehaviorInterceptor],
                 stream_pool: futures.ThreadPoolExecutor | None = None) -> None:
        self.server = server
        self.behaviors = tuple(behaviors)
        self.stream_pool = stream_pool

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the generated code registers the same methods by name just after."""

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: wrap_handler(h, f"/{service}/{name}", self.behaviors, self.stream_pool)
                   for name, h in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self.server.add_registered_method_handlers(service, wrapped)
