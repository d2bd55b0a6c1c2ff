"""A server interceptor that runs each call of any kind (unary or streaming) inside a context
manager, so identity, logging and error mapping are written once for every RPC shape.

It also decodes requests itself: bytes that are no valid message of the request type (corrupt or
truncated wire format, invalid UTF-8 in a string) would make gRPC answer a bare INTERNAL
("Exception deserializing request!") before any interceptor runs. Here they become a marker that
the innermost interceptor turns into INVALID_ARGUMENT, inside every interceptor's scope: the call
is logged, authenticated and authorized like any other before its body is refused.

The innermost interceptor also binds the call's deadline for the storage layer (entitlement/
deadline.py), and turns a client stream that ends because the client gave up (cancelled, deadline
passed) into CANCELLED or DEADLINE_EXCEEDED instead of an unexpected error (gRPC raises a bare
RpcError from the request iterator)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
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


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    it = iter(requests)
    while True:
        try:
            request = next(it)
        except StopIteration:
            return
        except grpc.RpcError:  # gRPC ends the request stream so when the client is gone
            raise (deadline.exceeded() if deadline.expired() else
                   Cancelled("the client cancelled the call while sending its requests; nothing was "
                             "committed")) from None
        yield _checked(request)


def _call_deadline(context: grpc.ServicerContext) -> AbstractContextManager[None]:
    return deadline.bound(context.time_remaining(), context.is_active)


class BehaviorInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def scope(self, method: str, metadata: tuple[Any, ...] | None,
              context: grpc.ServicerContext) -> AbstractContextManager[None]:
        """The context every call of `method` runs in (override)."""
        raise NotImplementedError

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method, metadata = details.method, details.invocation_metadata
        scope = self.scope
        # The innermost of our interceptors (the first to see the real handler's deserializer)
        # refuses undecodable requests; the outer ones pass the marker on.
        innermost = not getattr(handler.request_deserializer, "tolerant", False)
        check = _checked if innermost else (lambda r: r)
        check_stream = _checked_stream if innermost else (lambda rs: rs)
        bind: Callable[[grpc.ServicerContext], AbstractContextManager[None]] = \
            _call_deadline if innermost else (lambda _c: nullcontext())
        kw = {"request_deserializer": _tolerant(handler.request_deserializer),
              "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                with scope(method, metadata, context), bind(context):
                    return inner(check(request), context)
            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with scope(method, metadata, context), bind(context):
                    yield from inner_us(check(request), context)
            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            def stream_unary(requests: Any, context: grpc.ServicerContext) -> Any:
                with scope(method, metadata, context), bind(context):
                    return inner_su(check_stream(requests), context)
            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        inner_ss = handler.stream_stream

        def stream_stream(requests: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with scope(method, metadata, context), bind(context):
                yield from inner_ss(check_stream(requests), context)
        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)
