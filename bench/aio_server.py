"""The grpc.aio variant of entitlement.server_main.start, for the benchmark only.

Same servicers, same behaviours around every call, same options; what differs is the server model.
Each of our methods is wrapped ONCE, at registration, in the production behaviours exactly as the
sync server wraps it (`server_main.call_behaviors`: access log, caller's identity, rate limit;
`entitlement.api.wrapping.wrap_handler`: tolerant decoding, the call's deadline, pre-serialized
answers), and the wrapped sync function is then run
- in a ThreadPoolExecutor of the sync server's pool size (`loop.run_in_executor`, model aio), inside
  a copy of the call's contextvars (as asyncio.to_thread does), with a SyncContext (the sync
  ServicerContext calls our code makes, done on the event loop); a server stream's responses reach
  the loop one by one, each stream holding a pool thread as it does in the sync server;
- or, for the unary methods named in `inline` (model aio-inline: bench.aio_server.HOT_READS), on the
  event loop itself, with an InlineContext: no thread hand-over at all for those calls (the sync
  server cannot do this: its handler waits for the request message, which only its polling thread
  delivers). Meant for SQLite's reads: on PostgreSQL it shows what a blocking round trip on the
  loop costs (the loop stops meanwhile).
An abort (our access log's `context.abort_with_status`) is raised through the sync code and awaited
on the loop (`context.abort` is a coroutine in grpc.aio). Streaming methods run on a pool of their
own (`stream_executor`, the sync server's stream_workers), as in the sync server. Health and
reflection are served bare, as in the sync server. Unlike it, the twin runs no database health
monitor (no fail-fast during an outage, no health status change): the benchmark has no outage.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from entitlement.api import servicers as api_servicers
from entitlement.api.wrapping import BehaviorInterceptor, wrap_handler
from entitlement.app import Context
from entitlement.server_main import SERVICE_NAMES, call_behaviors, concurrency_limit


# ------------------------------------------------------------------------------------ servicers

def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the event loop from a pool thread and return its result (aio objects are not
    thread-safe)."""
    async def run() -> Any:
        return fn()
    return asyncio.run_coroutine_threadsafe(run(), loop).result()


class _AbortFromThread(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, status: grpc.Status | None = None) -> None:
        super().__init__(details)
        self.code, self.details, self.status = code, details, status


class SyncContext:
    """The grpc.ServicerContext a sync servicer method expects, over the call's aio context, for
    use from a pool thread (the calls our servicers and the sync server's API make). Made on the
    event loop: the call's deadline and its end are noted there, so that the deadline binding of
    every call (time_remaining, is_active) costs the pool thread no trip to the loop."""

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop) -> None:
        self._context, self._loop = context, loop
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        self._ended = threading.Event()
        context.add_done_callback(lambda _context: self._ended.set())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        def register() -> bool:
            if self._context.done():
                return False
            self._context.add_done_callback(lambda _context: callback())
            return True
        return bool(_on_loop(self._loop, register))

    def is_active(self) -> bool:
        return not self._ended.is_set()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._context.peer()  # type: ignore[no-any-return]

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _AbortFromThread(code, details)

    def abort_with_status(self, status: grpc.Status) -> None:
        raise _AbortFromThread(status.code, status.details, status)

    def set_code(self, code: grpc.StatusCode) -> None:
        _on_loop(self._loop, lambda: self._context.set_code(code))

    def set_details(self, details: str) -> None:
        _on_loop(self._loop, lambda: self._context.set_details(details))

    def set_trailing_metadata(self, metadata: Any) -> None:
        _on_loop(self._loop, lambda: self._context.set_trailing_metadata(metadata))

    def code(self) -> Any:
        return _on_loop(self._loop, self._context.code)


class _BlockingRequests:
    """A client stream seen from a pool thread: each next() waits for the event loop to read the
    next message of the aio request iterator."""

    def __init__(self, requests: AsyncIterator[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._requests, self._loop = requests, loop

    def __iter__(self) -> "_BlockingRequests":
        return self

    def __next__(self) -> Any:
        async def receive() -> Any:
            return await self._requests.__anext__()
        try:
            return asyncio.run_coroutine_threadsafe(receive(), self._loop).result()
        except StopAsyncIteration:
            raise StopIteration from None


async def _reraise_abort(context: grpc.aio.ServicerContext, abort: _AbortFromThread) -> None:
    if abort.status is not None:
        await context.abort_with_status(abort.status)
    await context.abort(abort.code, abort.details)


_END = object()


def _offload(method: Callable[[Any, Any], Any], executor: futures.Executor,
             client_streaming: bool, server_streaming: bool) -> Callable[[Any, Any], Any]:
    """An async method of the same shape that runs the sync `method` in `executor`, inside a copy
    of the caller's contextvars, with a SyncContext. A server stream's responses are handed to the
    event loop one by one as the sync iterator yields them."""

    def args(request: Any, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop) -> tuple[Any, Any]:
        return (_BlockingRequests(request, loop) if client_streaming else request), SyncContext(context, loop)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, contextvars.copy_context().run, method,
                                              *args(request, context, loop))
        except _AbortFromThread as abort:
            await _reraise_abort(context, abort)

    async def call_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def drain(*a: Any) -> None:
            try:
                for item in method(*a):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # handed to the loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        done = loop.run_in_executor(executor, contextvars.copy_context().run, drain, *args(request, context, loop))
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, _AbortFromThread):
                    await _reraise_abort(context, item)
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if done.done():
                done.result()

    wrapper = call_stream if server_streaming else call
    wrapper.__name__ = method.__name__
    return wrapper


class InlineContext(SyncContext):
    """The same, for a method run on the event loop itself: every call goes straight to the aio
    context (through the loop, it would wait for itself)."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self._context.done():
            return False
        self._context.add_done_callback(lambda _context: callback())
        return True

    def is_active(self) -> bool:
        return not self._context.done()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()  # type: ignore[no-any-return]

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata(metadata)

    def code(self) -> Any:
        return self._context.code()


def _inline(method: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """An async unary method that runs the sync unary `method` on the event loop (no thread)."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return method(request, InlineContext(context))
        except _AbortFromThread as abort:
            await _reraise_abort(context, abort)

    call.__name__ = method.__name__
    return call


# The model aio-inline's methods run on the event loop: the reads of bench/__main__.py's cases.
HOT_READS = frozenset({"CheckEligibility", "VerifyEntitlement"})


class _AioRegistrar:
    """Stands in for the server in the generated `add_*Servicer_to_server` functions (as the sync
    server's WrappingRegistrar does): each method's handler wrapped once in `behaviors`, then served
    by the aio server inline or offloaded (see the module docstring)."""

    def __init__(self, server: grpc.aio.Server, behaviors: list[BehaviorInterceptor],
                 executor: futures.Executor, stream_executor: futures.Executor, inline: frozenset[str]) -> None:
        self.server, self.behaviors, self.inline = server, behaviors, inline
        self.executor, self.streams = executor, stream_executor

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the generated code registers the same methods by name just after."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        served = {}
        for name, handler in handlers.items():
            w = wrap_handler(handler, f"/{service}/{name}", self.behaviors)
            kw = {"request_deserializer": w.request_deserializer, "response_serializer": w.response_serializer}
            if w.unary_unary is not None:
                fn = (_inline(w.unary_unary) if name in self.inline
                      else _offload(w.unary_unary, self.executor, False, False))
                served[name] = grpc.unary_unary_rpc_method_handler(fn, **kw)
            elif w.unary_stream is not None:
                served[name] = grpc.unary_stream_rpc_method_handler(
                    _offload(w.unary_stream, self.streams, False, True), **kw)
            elif w.stream_unary is not None:
                served[name] = grpc.stream_unary_rpc_method_handler(
                    _offload(w.stream_unary, self.streams, True, False), **kw)
            else:
                served[name] = grpc.stream_stream_rpc_method_handler(
                    _offload(w.stream_stream, self.streams, True, True), **kw)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, served),))


# ------------------------------------------------------------------------------------- server

def servicers(ctx: Context) -> list[tuple[Any, ServiceDescriptor, Callable[[Any, Any], None]]]:
    """Every servicer of entitlement.api.servicers, with its service descriptor and generated
    add_*_to_server function, found from its generated base class (so a service added to the
    server is served by the aio twin too)."""
    out = []
    for _name, cls in sorted(vars(api_servicers).items()):
        if not isinstance(cls, type) or cls.__module__ != api_servicers.__name__:
            continue
        for base in cls.__mro__[1:]:
            grpc_module = sys.modules.get(base.__module__)
            if grpc_module is None or not base.__module__.endswith("_pb2_grpc") or not base.__name__.endswith("Servicer"):
                continue
            service_name = base.__name__[: -len("Servicer")]
            pb2 = importlib.import_module(base.__module__[: -len("_grpc")])
            out.append((cls(ctx), pb2.DESCRIPTOR.services_by_name[service_name],
                        getattr(grpc_module, f"add_{base.__name__}_to_server")))
            break
    if not out:
        raise RuntimeError("no servicer found in entitlement.api.servicers")
    return out


def build(ctx: Context, executor: futures.ThreadPoolExecutor, stream_executor: futures.ThreadPoolExecutor,
          inline: frozenset[str] = frozenset()) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The aio twin of entitlement.server_main.start (not started; add a port and start it): unary
    calls offloaded to `executor`, streaming ones to `stream_executor`, the unary methods named in
    `inline` run on the event loop."""
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)],
        maximum_concurrent_rpcs=concurrency_limit(ctx.settings),
    )
    ours = _AioRegistrar(server, call_behaviors(ctx), executor, stream_executor, inline)
    for sync_servicer, _service, add in servicers(ctx):
        add(sync_servicer, ours)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer) -> None:
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
