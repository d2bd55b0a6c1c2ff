"""A server interceptor that runs each call of any kind (unary or streaming) inside a context
manager, so identity, logging and error mapping are written once for every RPC shape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import grpc


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
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                with scope(method, metadata, context):
                    return inner(request, context)
            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with scope(method, metadata, context):
                    yield from inner_us(request, context)
            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            def stream_unary(requests: Any, context: grpc.ServicerContext) -> Any:
                with scope(method, metadata, context):
                    return inner_su(requests, context)
            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        inner_ss = handler.stream_stream

        def stream_stream(requests: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with scope(method, metadata, context):
                yield from inner_ss(requests, context)
        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)

