"""Behaviours that run around every call of our services (identity, access log and error mapping,
rate limit), written once for every RPC shape (unary or streaming).

They are applied by wrapping each method's handler ONCE, when the services are registered
(`WrappingRegistrar`), not as gRPC server interceptors: a server interceptor runs on every call and
builds a new method handler each time, which on the hot path cost more than a registry lookup.
`BehaviorInterceptor` still works as a server interceptor (bench/aio_server.py uses that form)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import grpc


class BehaviorInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def scope(self, method: str, metadata: tuple[Any, ...] | None,
              context: grpc.ServicerContext) -> AbstractContextManager[None]:
        """The context every call of `method` runs in (override)."""
        raise NotImplementedError

    def applies_to(self, method: str) -> bool:
        """Whether calls of `method` run in this behaviour's scope at all (override to skip)."""
        return True

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not self.applies_to(details.method):
            return handler
        return wrap_handler(handler, details.method, (self,))


def _scoped(fn: Callable[[Any, grpc.ServicerContext], Any], method: str, behavior: BehaviorInterceptor,
            streaming_response: bool) -> Callable[[Any, grpc.ServicerContext], Any]:
    scope = behavior.scope
    if streaming_response:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with scope(method, context.invocation_metadata(), context):
                yield from fn(request, context)
        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        with scope(method, context.invocation_metadata(), context):
            return fn(request, context)
    return unary


def wrap_handler(handler: grpc.RpcMethodHandler, method: str,
                 behaviors: Sequence[BehaviorInterceptor]) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour run inside each of `behaviors`' scopes (the first outermost)."""
    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    for make, fn, streaming in ((grpc.unary_unary_rpc_method_handler, handler.unary_unary, False),
                                (grpc.unary_stream_rpc_method_handler, handler.unary_stream, True),
                                (grpc.stream_unary_rpc_method_handler, handler.stream_unary, False),
                                (grpc.stream_stream_rpc_method_handler, handler.stream_stream, True)):
        if fn is not None:
            for behavior in reversed([b for b in behaviors if b.applies_to(method)]):
                fn = _scoped(fn, method, behavior, streaming)
            return make(fn, **kw)
    raise ValueError(f"{method}: a method handler with no behaviour")


class WrappingRegistrar:
    """Stands in for the server in the generated `add_*Servicer_to_server` functions: registers
    each method's handler wrapped once in `behaviors` (see the module docstring)."""

    def __init__(self, server: grpc.Server, behaviors: Sequence[BehaviorInterceptor]) -> None:
        self.server = server
        self.behaviors = tuple(behaviors)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the generated code registers the same methods by name just after."""

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: wrap_handler(h, f"/{service}/{name}", self.behaviors) for name, h in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self.server.add_registered_method_handlers(service, wrapped)
