"""The grpc.aio variant of entitlement.server_main.start, for the benchmark only.

Same servicers, same interceptors' code, same options; what differs is the server model:
- the handlers are async wrappers that run the *same sync servicer methods* in a ThreadPoolExecutor
  of the same size as the sync server's (`loop.run_in_executor`), inside a copy of the call's
  contextvars (as asyncio.to_thread does) so current_caller() and the structlog context bound by
  the interceptors reach the handler thread; they get a SyncContext (the sync ServicerContext
  calls they make, done on the event loop), and a server stream's responses reach the loop one
  by one, each stream holding a pool thread as it does in the sync server;
- grpc.aio refuses sync `grpc.ServerInterceptor`s, so each of our two interceptors is adapted by
  an aio interceptor that runs the interceptor's own `scope()` context manager around the awaited
  handler, on the event loop. The one thing scope() does that an aio context cannot take
  synchronously is `context.abort_with_status` (a coroutine in grpc.aio): scope() gets a shim
  whose abort_with_status raises, and the adapter awaits the real abort. Work per call is the same
  code in both models: request id, log binding, bearer check, role table, error mapping, one access
  log line.

`build(..., inline=HOT_READS)` (model aio-inline) runs the unary methods named there on the event
loop itself instead of the pool: no thread hand-over at all for those calls (the sync server cannot
do this: its handler waits for the request message, which only its polling thread delivers). Only
for SQLite's reads: a PostgreSQL round trip would stop the loop meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from entitlement.api import servicers as api_servicers
from entitlement.api.accesslog import AccessLogInterceptor
from entitlement.api.identity import CallerInterceptor
from entitlement.api.wrapping import BehaviorInterceptor, passthrough
from entitlement.app import Context
from entitlement.server_main import SERVICE_NAMES


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
    use from a pool thread (the calls our servicers and the sync server's API make)."""

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop) -> None:
        self._context, self._loop = context, loop

    def add_callback(self, callback: Callable[[], None]) -> bool:
        def register() -> bool:
            if self._context.done():
                return False
            self._context.add_done_callback(lambda _context: callback())
            return True
        return bool(_on_loop(self._loop, register))

    def is_active(self) -> bool:
        return not _on_loop(self._loop, self._context.done)

    def time_remaining(self) -> float | None:
        return _on_loop(self._loop, self._context.time_remaining)  # type: ignore[no-any-return]

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


class AsyncServicer:
    """An async servicer of `service` whose methods offload the sync servicer's methods, except the
    unary ones named in `inline`, run on the event loop."""

    def __init__(self, sync_servicer: Any, service: ServiceDescriptor, executor: futures.Executor,
                 inline: frozenset[str] = frozenset()) -> None:
        for m in service.methods:
            method = getattr(sync_servicer, m.name)
            if m.name in inline and not m.client_streaming and not m.server_streaming:
                setattr(self, m.name, _inline(method))
            else:
                setattr(self, m.name, _offload(method, executor, m.client_streaming, m.server_streaming))


# --------------------------------------------------------------------------------- interceptors

class _AbortRequested(Exception):
    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.code)
        self.status = status


class _AbortShim:
    """Stands for the aio context inside a sync scope(): abort is deferred to the async adapter."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def abort_with_status(self, status: grpc.Status) -> None:
        raise _AbortRequested(status)

    def code(self) -> Any:
        return self._context.code()


class AsyncScopeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Runs a BehaviorInterceptor's scope() around every call of any shape, for grpc.aio."""

    def __init__(self, sync_interceptor: BehaviorInterceptor) -> None:
        self.sync = sync_interceptor

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method, metadata = details.method, details.invocation_metadata
        scope = self.sync.scope
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": passthrough(handler.response_serializer)}  # as wrap_handler
        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    with scope(method, metadata, _AbortShim(context)):
                        return await inner(request, context)
                except _AbortRequested as abort:
                    await context.abort_with_status(abort.status)
            make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            return make(unary_response, **kw)
        inner_stream = handler.unary_stream or handler.stream_stream
        make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        if not inspect.isasyncgenfunction(inner_stream):  # a coroutine that writes with context.write
            async def writing_response(request: Any, context: grpc.aio.ServicerContext) -> None:
                try:
                    with scope(method, metadata, _AbortShim(context)):
                        await inner_stream(request, context)
                except _AbortRequested as abort:
                    await context.abort_with_status(abort.status)
            return make(writing_response, **kw)

        async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                with scope(method, metadata, _AbortShim(context)):
                    async for item in inner_stream(request, context):
                        yield item
            except _AbortRequested as abort:
                await context.abort_with_status(abort.status)
        return make(stream_response, **kw)


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


def build(ctx: Context, executor: futures.ThreadPoolExecutor,
          inline: frozenset[str] = frozenset()) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The aio twin of entitlement.server_main.start (not started; add a port and start it); the
    unary methods named in `inline` run on the event loop."""
    server = grpc.aio.server(
        interceptors=[AsyncScopeInterceptor(AccessLogInterceptor()), AsyncScopeInterceptor(CallerInterceptor(ctx.callers))],
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)],
        maximum_concurrent_rpcs=ctx.settings.max_workers * 8,
    )
    for sync_servicer, service, add in servicers(ctx):
        add(AsyncServicer(sync_servicer, service, executor, inline), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer) -> None:
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
