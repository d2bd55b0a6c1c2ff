"""The event-loop server model (ENTITLEMENT_SERVER_MODEL; README "Server models"): a grpc.aio
server serving the same servicers, wrapped in the same behaviours, as entitlement.server_main's
thread-pool server, with the hot reads answered on the event loop itself.

Why: on SQLite, a check or a verification is one short local read (no network, no lock wait in WAL
mode). In the thread-pool server every call is handed from gRPC's polling thread to a pool thread
and back, and the threads contend for the interpreter lock; on the event loop, gRPC's own poller
delivers the request and the answer leaves from the same thread. Measured: 1.13x to 1.36x the checks
per second of the thread-pool server on the same machine, 0.98x to 1.18x the verifications
(BENCHMARKS.md, "Server models"; README "Server models").

How each of our methods is served (wrapped ONCE, at registration, in the production behaviours
exactly as the thread-pool server wraps them: `server_main.call_behaviors` (access log, caller's
identity, rate limit) and `entitlement.api.wrapping.wrap_handler` (tolerant decoding, the call's
deadline, pre-serialized answers)):
- the unary methods named in `inline` (`inline_methods`: CheckEligibility and VerifyEntitlement on
  SQLite; CheckEligibility not when a live status source is configured, whose HTTP lookups would
  stop the loop) run on the event loop, with an InlineContext;
- the writes of a signup (`loop_write_methods`: ActivateEntitlement and RedeemActivationToken on
  SQLite, unless ENTITLEMENT_LOOP_WRITES is off) run on the event loop when their write need not
  wait, else in the executor (`_loop_write`; entitlement/storage/db.py "Writes on the event loop");
- every other unary method runs in a ThreadPoolExecutor of max_workers threads
  (`loop.run_in_executor`) inside a copy of the call's contextvars, with a SyncContext (the
  grpc.ServicerContext calls our code makes, done through the loop when they touch the call);
- streaming methods run on a pool of their own (stream_workers threads), as in the thread-pool
  server. A server stream's responses reach the loop through a bounded queue (the pool thread
  waits while the client reads slowly); a client stream's requests are read by the loop one by one.
  Either stops waiting once the call is over (cancelled, deadline passed); a server stream over
  before a thread took it is not run at all (as in the thread-pool server).
An abort (our access log's `context.abort_with_status`) is raised through the sync code and awaited
on the loop (`context.abort` is a coroutine in grpc.aio). Health (grpc.health.v1, kept in step with
the database by entitlement.dbhealth's monitor, as in the thread-pool server) and reflection are
served bare. Every method is found in one table (_MethodTable), none registered with gRPC's core.

The loop runs in a thread of its own ("rpc-loop"); `start` returns a LoopRunning with the
thread-pool server's Running interface (port, monitor, set_serving, stop): server.py's signal
handling (entitlement.server_main.serve_forever stops the server once, from its main thread), several
processes on one port (SO_REUSEPORT) and TLS are the same for both models.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from entitlement.api import public
from entitlement.api import servicers as api_servicers
from entitlement.api.wrapping import BehaviorInterceptor, wrap_handler
from entitlement.app import Context
from entitlement.config import ASYNCIO, UVLOOP, EventLoopUnavailable, resolve_event_loop
from entitlement.dbhealth import DatabaseMonitor
from entitlement.storage.db import Database, LoopWriteDeferred, loop_write
from entitlement.server_main import (SERVICE_NAMES, add_port, call_behaviors, concurrency_limit, server_credentials,
                                     server_options)
from entitlement.tls import ServerTLS

STREAM_BUFFER = 16  # a server stream's responses made ahead of what the loop has taken
_ENDED_POLL_S = 0.1  # a pool thread waiting on the loop checks this often whether the call is over

# ------------------------------------------------------------------------------------ servicers

class _CallEnded(grpc.RpcError):  # type: ignore[misc]
    """What a pool thread meets when it waits on the loop for a call that is over (cancelled,
    deadline passed, server stopped): for a client stream, what the sync server's request iterator
    raises then (entitlement.api.wrapping maps it)."""


_GONE = object()


def _from_thread(loop: asyncio.AbstractEventLoop, start: Callable[[], Any],
                 ended: Callable[[], bool] = lambda: False, gone: Any = _GONE) -> Any:
    """Run `start` on the event loop from a pool thread and return its result, awaited on the loop
    when it is awaitable (aio objects are not thread-safe). Waits in slices: once the call has
    `ended` or the loop no longer runs (the server stopped), stops waiting and returns `gone`
    (raises _CallEnded when none is given): what was not started yet never starts, an awaitable
    already started is cancelled while the loop still runs (on a stopped loop it is left as is)."""
    done: futures.Future[Any] = futures.Future()
    task: list[asyncio.Future[Any]] = []

    def finish(t: asyncio.Future[Any]) -> None:
        if t.cancelled():
            done.set_exception(_CallEnded())
        elif (exc := t.exception()) is not None:
            done.set_exception(exc)
        else:
            done.set_result(t.result())

    def run() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            value = start()
            if not inspect.isawaitable(value):
                done.set_result(value)
                return
            task.append(asyncio.ensure_future(value))
            task[0].add_done_callback(finish)
        except BaseException as exc:  # handed to the waiting thread
            done.set_exception(exc)

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # the loop is closed: the server has stopped
        done.cancel()
    while not done.cancelled():
        finished, _ = futures.wait((done,), timeout=_ENDED_POLL_S)
        if finished:
            if done.cancelled():
                break
            return done.result()  # (a TimeoutError raised on the loop is its result, not our wait's)
        if ended() or not loop.is_running():
            if done.cancel():  # not started on the loop: it never will be
                break
            if not loop.is_running():
                break
            if task:
                try:
                    loop.call_soon_threadsafe(task[0].cancel)  # answered by finish: _CallEnded
                except RuntimeError:  # the loop closed meanwhile
                    break
    if gone is _GONE:
        raise _CallEnded()
    return gone


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any], gone: Any = None) -> Any:
    """`fn()` run on the loop (a call on the call's aio context); `gone` once the server stopped."""
    return _from_thread(loop, fn, gone=gone)


class _AbortFromThread(Exception):
    """An abort asked for through one of the adapters below, raised through the sync code and
    applied on the loop by the method's wrapper (`context.abort` is a coroutine in grpc.aio)."""

    def __init__(self, code: grpc.StatusCode, details: str, status: grpc.Status | None = None) -> None:
        super().__init__(details)
        self.code, self.details, self.status = code, details, status

    @property
    def abort_code(self) -> grpc.StatusCode:
        """The status it ends the call with: a handler's own abort's stands (the access log reads
        it: the aio context has no code set yet while this goes up through the behaviours)."""
        return self.code


class _CallContext:
    """What both adapters below share: the grpc.ServicerContext calls that only read the call's
    aio context or raise (an abort, awaited on the loop by the method's wrapper). SyncContext reads
    the peer and the auth context otherwise: they read gRPC's call object, freed once the call is
    over, which a pool thread may outlive."""

    _context: grpc.aio.ServicerContext
    _metadata: Any = None

    def invocation_metadata(self) -> Any:
        # Kept: grpc.aio builds the tuple afresh at every call of its own (one per behaviour).
        if self._metadata is None:
            self._metadata = self._context.invocation_metadata()
        return self._metadata

    def peer(self) -> str:
        return self._context.peer()  # type: ignore[no-any-return]

    def auth_context(self) -> Any:
        return self._context.auth_context()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _AbortFromThread(code, details)

    def abort_with_status(self, status: grpc.Status) -> None:
        raise _AbortFromThread(status.code, status.details, status)


class SyncContext(_CallContext):
    """The grpc.ServicerContext a sync servicer method expects, over the call's aio context, for
    use from a pool thread (the calls our servicers and the sync server's API make). Made on the
    event loop: the call's deadline and its end are noted there, so that the deadline binding of
    every call (time_remaining, is_active) costs the pool thread no trip to the loop."""

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop,
                 ended_early: "EndedEarly | None" = None) -> None:
        self._context, self._loop, self._ended_early = context, loop, ended_early
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        # Read here, on the loop, while the call is alive (a client certificate's caller is read
        # from it at the call's start and again by a stream's checks): grpc.aio frees its call
        # object as soon as the call is over (cancelled, deadline passed), and reading it then
        # from a pool thread was a segmentation fault of the whole process (mutual TLS, calls given
        # up as a pool thread took them: tests/test_security.py).
        self._auth = context.auth_context()
        # Likewise the metadata (every call reads it: the caller's identity, the access log): read
        # after the call's end it gave garbage for 298 of 300 calls in a scratch test of grpc.aio;
        # no failure through this server was seen, the window being a few microseconds.
        self._metadata = context.invocation_metadata()
        # The callback holds the event alone, not this object: gRPC keeps its done callbacks in a
        # reference cycle of its own objects (the context, the call's state), left to the cyclic
        # collector; this object, and what a handler hung on it, stay out of that cycle.
        ended = self._ended = threading.Event()
        context.add_done_callback(lambda _context: ended.set())
        self._task = asyncio.current_task()  # the call's handler task (end_now)

    def auth_context(self) -> Any:
        return self._auth

    def peer(self) -> str:
        ended = self._ended  # (read on the loop, for the reason above; "" once the call is over)
        return str(_on_loop(self._loop, lambda: "" if ended.is_set() or self._context.done() else self._context.peer(),
                            gone=""))

    def add_callback(self, callback: Callable[[], None]) -> bool:
        ended = self._ended

        def register() -> bool:
            # False once the call is over, as the sync server's: the aio context's done() says only
            # whether a status was sent (not so for a call its client cancelled or let expire), and
            # a callback added after the call's end is never run.
            if ended.is_set() or self._context.done():
                return False
            self._context.add_done_callback(lambda _context: callback())
            return True
        return bool(_on_loop(self._loop, register, gone=False))

    def is_active(self) -> bool:
        return not self._ended.is_set()

    def end_now(self, code: grpc.StatusCode, details: str) -> None:
        """End the call now with this status, from a thread other than the loop, whatever its
        handler is doing (entitlement.api.servicers `_end_call`): a server stream whose client
        stopped reading has its loop side held in a write that HTTP/2 flow control never completes,
        and its pool thread held waiting for it (`hand_over`). grpc.aio cannot cancel a call on the
        server side: the status is sent (after what the client has not read yet) and the handler's
        task cancelled, which ends the call for us (its done callbacks: the pool thread lets go,
        the stream's slot is given back). gRPC's call stays until its client reads on, goes away or
        reaches its deadline; a stop does not wait for it (LoopRunning.stop)."""
        context, task, ended, counted = self._context, self._task, self._ended, self._ended_early

        async def send_status() -> None:
            try:
                await context.abort(code, details)
            except Exception:  # noqa: BLE001 (the AbortError that abort raises by design, or the call over)
                pass

        def end() -> None:
            if ended.is_set() or context.done():
                return
            asyncio.ensure_future(send_status())  # (first: the status is set before the task ends)
            if task is not None:
                task.cancel()
            if counted is not None:
                counted.calls += 1
        _on_loop(self._loop, end)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

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
    next message of the aio request iterator, and raises _CallEnded once the call is over (the
    client cancelled, its deadline passed, the server stopped), as the sync server's request
    iterator raises an RpcError then. (gRPC may also end a cancelled call's stream as if the
    client had finished sending: entitlement.api.wrapping tells the two apart, for both models.)"""

    def __init__(self, requests: AsyncIterator[Any], loop: asyncio.AbstractEventLoop,
                 context: "SyncContext") -> None:
        self._requests, self._loop, self._context = requests, loop, context

    def __iter__(self) -> "_BlockingRequests":
        return self

    def __next__(self) -> Any:
        try:
            return _from_thread(self._loop, self._requests.__anext__, ended=lambda: not self._context.is_active())
        except StopAsyncIteration:
            raise StopIteration from None


async def _reraise_abort(context: grpc.aio.ServicerContext, abort: _AbortFromThread) -> None:
    if abort.status is not None:
        await context.abort_with_status(abort.status)
    await context.abort(abort.code, abort.details)


_END = object()


class EndedEarly:
    """The calls of one server whose handler SyncContext.end_now ended (on its loop): their
    gRPC call may outlive it (LoopRunning._stop_server)."""

    def __init__(self) -> None:
        self.calls = 0


def _offload(method: Callable[[Any, Any], Any], executor: futures.Executor,
             client_streaming: bool, server_streaming: bool,
             ended_early: EndedEarly | None = None) -> Callable[[Any, Any], Any]:
    """An async method of the same shape that runs the sync `method` in `executor`, inside a copy
    of the caller's contextvars, with a SyncContext. A server stream's responses are handed to the
    event loop one by one as the sync iterator yields them."""

    def args(request: Any, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop) -> tuple[Any, Any]:
        sync_context = SyncContext(context, loop, ended_early)
        return (_BlockingRequests(request, loop, sync_context) if client_streaming else request), sync_context

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, contextvars.copy_context().run, method,
                                              *args(request, context, loop))
        except _AbortFromThread as abort:
            await _reraise_abort(context, abort)

    async def call_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        # Bounded: the pool thread makes the next response only when the loop has taken the earlier
        # ones (a long stream is not buffered whole when the client reads slowly), as the sync
        # server pulls its response iterator as it sends.
        queue: asyncio.Queue[Any] = asyncio.Queue()
        slots = threading.Semaphore(STREAM_BUFFER)  # responses handed over and not yet taken
        request, sync_context = args(request, context, loop)

        def hand_over(item: Any) -> bool:
            while not slots.acquire(timeout=_ENDED_POLL_S):
                if not sync_context.is_active() or not loop.is_running():
                    return False  # the client is gone, or the server stopped: no more responses
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: the server has stopped
                return False
            return True

        def drain() -> None:
            if not sync_context.is_active():
                return  # over while it waited for a thread (as in the sync server, the method never runs)
            responses: Any = ()
            try:
                responses = method(request, sync_context)
                for item in responses:
                    if not hand_over(item):
                        return
            except BaseException as exc:  # handed to the loop, raised there
                hand_over(exc)
            else:
                hand_over(_END)
            finally:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()  # the method's scopes end (its access log line) in this thread

        loop.run_in_executor(executor, contextvars.copy_context().run, drain)
        while (item := await queue.get()) is not _END:
            slots.release()
            if isinstance(item, _AbortFromThread):
                await _reraise_abort(context, item)
            if isinstance(item, BaseException):
                raise item
            yield item

    wrapper = call_stream if server_streaming else call
    wrapper.__name__ = method.__name__
    return wrapper


class InlineContext(_CallContext):
    """The same as SyncContext, for a method run on the event loop itself: every call goes straight
    to the aio context (through the loop, it would wait for itself)."""

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


def _loop_write(method: Callable[[Any, Any], Any], executor: futures.Executor, db: Database) -> Callable[[Any, Any], Any]:
    """An async unary method that runs the sync unary `method`, a write, on the event loop when the
    database lets it write there without waiting (`Database.loop_writes_ok`, entitlement/storage/db.py
    `loop_write`), and in `executor` otherwise, or when its write was deferred (LoopWriteDeferred:
    raised before anything was written or logged; the call then runs from its start in the pool)."""
    offloaded = _offload(method, executor, False, False)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if db.loop_writes_ok():
            try:
                with loop_write():
                    return method(request, InlineContext(context))
            except LoopWriteDeferred:
                pass
            except _AbortFromThread as abort:
                await _reraise_abort(context, abort)
                return None
        return await offloaded(request, context)

    call.__name__ = method.__name__
    return call


# The hot reads: CheckEligibility (the registry lookup) and VerifyEntitlement (one account's status).
HOT_READS = frozenset({"CheckEligibility", "VerifyEntitlement"})
# The writes of a signup (entitlement/storage/db.py "Writes on the event loop"): run on the loop when
# they need not wait, else in the pool.
LOOP_WRITES = frozenset({"ActivateEntitlement", "RedeemActivationToken"})


def inline_methods(ctx: Context) -> frozenset[str]:
    """The unary methods the event-loop server answers on the loop itself: the hot reads, when
    nothing in them can wait on a network (SQLite; CheckEligibility without a live status source).
    On PostgreSQL every method runs in the pool: a round trip on the loop would stop every call."""
    if ctx.db.dialect != "sqlite":
        return frozenset()
    return HOT_READS if ctx.live is None else HOT_READS - {"CheckEligibility"}


def loop_write_methods(ctx: Context) -> frozenset[str]:
    """The unary methods whose writes the event-loop server runs on the loop when they need not wait
    (`_loop_write`): on SQLite, unless ENTITLEMENT_LOOP_WRITES is off; ActivateEntitlement not when
    a live status source is configured (its HTTP lookup comes before the write)."""
    if ctx.db.dialect != "sqlite" or ctx.settings.loop_writes == "off":
        return frozenset()
    return LOOP_WRITES if ctx.live is None else LOOP_WRITES - {"ActivateEntitlement"}


class _MethodTable(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Every method the server serves (ours, health, reflection), by its full name: the server's
    one generic handler, one dict lookup a call.

    Why not gRPC's registered methods (what the generated `add_*_to_server` functions ask for):
    grpc.aio (1.85) keeps one task waiting for the next call of each registered method, besides
    the one for any other method, and after every call it waits again on all of them
    (`asyncio.wait`, a done-callback added to and removed from each task, twice a call). With
    health's three methods and reflection's one registered, every call of ours went through five
    tasks instead of one, and through one generic handler per service before its own; counted
    with valgrind (bench.instructions, event-loop server): a check 639,930 -> 613,368 instructions,
    a verification 541,857 -> 518,845 (the echo floor, one generic handler: 299,633).
    The thread-pool server keeps registered methods: its polling thread re-arms only the
    method whose call came."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.methods.get(handler_call_details.method)

    def add(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            full = f"/{service}/{name}"
            if full in self.methods:
                raise ValueError(f"method {full} registered twice")
            self.methods[full] = handler


class _TableRegistrar:
    """Stands in for the server in a generated `add_*_to_server` function (health, reflection):
    its handlers, as they are, go into the server's method table (_MethodTable)."""

    def __init__(self, table: _MethodTable) -> None:
        self.table = table

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the generated code registers the same methods by name just after."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.table.add(service, handlers)


class _AioRegistrar(_TableRegistrar):
    """The same for our servicers (as the sync server's WrappingRegistrar): each method's handler
    wrapped once in `behaviors`, then served by the aio server inline or offloaded (see the module
    docstring)."""

    def __init__(self, table: _MethodTable, behaviors: list[BehaviorInterceptor],
                 executor: futures.Executor, stream_executor: futures.Executor, inline: frozenset[str],
                 loop_writes: frozenset[str] = frozenset(), db: Database | None = None,
                 ended_early: EndedEarly | None = None) -> None:
        assert db is not None or not loop_writes, "writes on the loop need the database"
        super().__init__(table)
        self.behaviors, self.inline, self.loop_writes, self.db = behaviors, inline, loop_writes, db
        self.ended_early = ended_early
        self.executor, self.streams = executor, stream_executor

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        served = {}
        for name, handler in handlers.items():
            w = wrap_handler(handler, f"/{service}/{name}", self.behaviors)
            kw = {"request_deserializer": w.request_deserializer, "response_serializer": w.response_serializer}
            if w.unary_unary is not None:
                fn = (_inline(w.unary_unary) if name in self.inline
                      else _loop_write(w.unary_unary, self.executor, self.db)  # type: ignore[arg-type]
                      if name in self.loop_writes
                      else _offload(w.unary_unary, self.executor, False, False))
                served[name] = grpc.unary_unary_rpc_method_handler(fn, **kw)
            elif w.unary_stream is not None:
                served[name] = grpc.unary_stream_rpc_method_handler(
                    _offload(w.unary_stream, self.streams, False, True, self.ended_early), **kw)
            elif w.stream_unary is not None:
                served[name] = grpc.stream_unary_rpc_method_handler(
                    _offload(w.stream_unary, self.streams, True, False), **kw)
            else:
                served[name] = grpc.stream_stream_rpc_method_handler(
                    _offload(w.stream_stream, self.streams, True, True), **kw)
        self.table.add(service, served)


# ------------------------------------------------------------------------------------- server

def servicers(ctx: Context) -> list[tuple[Any, ServiceDescriptor, Callable[[Any, Any], None]]]:
    """Every servicer of entitlement.api.servicers, with its service descriptor and generated
    add_*_to_server function, found from its generated base class (so a service added to the
    thread-pool server is served by this one too)."""
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
          inline: frozenset[str], behaviors: list[BehaviorInterceptor] | None = None,
          loop_writes: frozenset[str] | None = None,
          on_stop: list[Callable[[], None]] | None = None,
          ended_early: EndedEarly | None = None) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The server (not started: add a port and start it, on the loop that is to run it): unary calls
    offloaded to `executor`, streaming ones to `stream_executor`, the unary methods named in
    `inline` run on the event loop, those in `loop_writes` (default: `loop_write_methods(ctx)`) on
    the loop when their write need not wait; `behaviors` default to server_main.call_behaviors(ctx).
    `on_stop` (when given) receives what to call as a graceful stop begins (the change and log
    streams' end: the servicers' stop_streams); `ended_early` counts the server streams ended from outside
    (SyncContext.end_now)."""
    if loop_writes is None:
        loop_writes = loop_write_methods(ctx)
    server = grpc.aio.server(options=server_options(ctx.settings),
                             maximum_concurrent_rpcs=concurrency_limit(ctx.settings))
    table = _MethodTable()
    ours = _AioRegistrar(table, call_behaviors(ctx) if behaviors is None else behaviors,
                         executor, stream_executor, inline, loop_writes, ctx.db, ended_early)
    for sync_servicer, _service, add in servicers(ctx):
        add(sync_servicer, ours)
        stop_streams = getattr(sync_servicer, "stop_streams", None)
        if on_stop is not None and stop_streams is not None:
            on_stop.append(stop_streams)
    # Health and reflection with their open streams capped (entitlement/api/public.py): each open
    # one counts against the process's concurrent-call limit on this server.
    limit = ctx.settings.public_streams
    health_servicer = public.CappedAioHealth(limit)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, _TableRegistrar(table))
    # (what reflection.enable_server_reflection does for an aio server, into the table)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(public.CappedAioReflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), limit), _TableRegistrar(table))
    server.add_generic_rpc_handlers((table,))
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool = True) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, status)


def _await_on(loop: asyncio.AbstractEventLoop, thread: threading.Thread, coro: Any) -> Any:
    """Run `coro` on the loop from another thread and wait for its result, in slices: if the loop's
    thread has died (an error escaped the loop), raise instead of waiting for good."""
    pending = asyncio.run_coroutine_threadsafe(coro, loop)
    while True:
        finished, _ = futures.wait((pending,), timeout=_ENDED_POLL_S)
        if finished:
            return pending.result()
        if not thread.is_alive():
            pending.cancel()
            raise RuntimeError("the event loop's thread has ended")


class LoopRunning:
    """A started event-loop server, with the interface of server_main.Running (port, monitor,
    set_serving, stop), every method called from a thread other than the loop's."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, server: grpc.aio.Server,
                 health_servicer: health.aio.HealthServicer, port: int, monitor: DatabaseMonitor | None,
                 pools: tuple[futures.ThreadPoolExecutor, ...], loop_writes: frozenset[str] = frozenset(),
                 on_stop: tuple[Callable[[], None], ...] = (), ended_early: EndedEarly | None = None) -> None:
        self._loop, self._thread, self.server, self.health = loop, thread, server, health_servicer
        self._ended_early = ended_early or EndedEarly()
        self._on_stop = on_stop  # called as the stop begins (server_main.Running.on_stop)
        self.loop_writes = loop_writes  # said in the "serving" line
        self.port, self.monitor, self._pools = port, monitor, pools
        self.event_loop = loop_kind(loop)  # said in the "serving" line
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()

    def set_serving(self, serving: bool) -> None:
        if self._loop.is_closed() or not self._thread.is_alive():
            return
        _await_on(self._loop, self._thread, set_serving(self.health, serving))

    def failure(self) -> str | None:
        """The loop's thread ended while nobody stopped it (an error escaped the loop): nothing
        answers calls any more, health checks included."""
        if not self._stopping and not self._thread.is_alive():
            return "the event loop's thread has ended"
        return None

    def stop(self, grace: float) -> None:
        """Graceful stop, as server_main.Running.stop: health NOT_SERVING first (load balancers
        drain), the change and log streams ended, then refuse new calls and let calls in flight finish
        within `grace` seconds; then the loop and the pools end. Done once: a later call returns when the first is done (the
        process stops it once, from its main thread: entitlement.server_main.serve_forever)."""
        with self._lock:
            first, self._stopping = not self._stopping, True
        if not first:
            self._stopped.wait()
            return
        try:
            if self.monitor is not None:
                self.monitor.stop()  # first: no ping may set SERVING again
            if self._thread.is_alive():
                self.set_serving(False)
                for stopping in self._on_stop:
                    stopping()
                _await_on(self._loop, self._thread, self._stop_server(grace))
            elif not self._loop.is_closed() and not self._loop.is_running():
                # The loop's thread died (failure()): run the loop here, once more, to stop the
                # server (its calls ended, its port let go) rather than leave that to the exit.
                self._loop.run_until_complete(asyncio.wait_for(self.server.stop(0), 10))
        finally:  # whatever failed above, the pools, the loop and its thread end
            for pool in self._pools:
                pool.shutdown(wait=False)  # their calls were ended with the server's
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            try:
                self._loop.close()
            finally:  # (uvloop's close raises in more cases than asyncio's): a later stop() never waits forever
                self._stopped.set()


    async def _stop_server(self, grace: float) -> None:
        """`server.stop(grace)`, except that the calls a handler of ours ended early (a server stream
        whose client stopped reading, ended by SyncContext.end_now: its status waits behind what its
        client has not read, and grpc.aio cannot cancel one call) do not hold it for the whole
        grace: once no call's handler runs and no more calls are open than those, the calls left
        are cancelled. A call's handler runs in a task gRPC names `HandleExceptions[method]`, and
        the call in one named `rpc_task` until it is over (grpc.aio 1.85): were they renamed, such
        calls would hold the stop for the grace again, as before."""
        if not self._ended_early.calls:
            await self.server.stop(grace)
            return
        loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(self.server.stop(grace))
        until = loop.time() + grace
        while not stopping.done():
            await asyncio.sleep(0)  # (a call accepted just before the stop gets its handler's task)
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            handlers = [t for t in pending if t.get_name().startswith("HandleExceptions[")]
            calls = [t for t in pending if t.get_name() == "rpc_task"]
            if calls and not handlers and len(calls) <= self._ended_early.calls:
                await self.server.stop(None)
                break
            left = until - loop.time()
            if left <= 0:
                break
            await asyncio.wait([stopping, *handlers, *calls], timeout=left, return_when=asyncio.FIRST_COMPLETED)
        await stopping


class _CannotListen(Exception):
    """Raised on the loop (a SystemExit there would end the loop's thread), turned into SystemExit
    by start() in its caller's thread."""


def new_event_loop(setting: str) -> asyncio.AbstractEventLoop:
    """A new event loop of the kind ENTITLEMENT_EVENT_LOOP gives (config.resolve_event_loop). Every
    call of this model goes through the loop: gRPC's poller thread wakes it through a socket for
    each event, and the answers, and the hand-overs to the pool and back, are its callbacks. Counted
    by valgrind (BENCHMARKS.md "instructions"), uvloop runs the aio echo call in 38 % fewer
    instructions than asyncio's loop, and a check or a verification in 23-27 % fewer (about 200,000
    a call); the answers are the same (tests/test_server_models.py serves every probe on both)."""
    if resolve_event_loop(setting) == UVLOOP:
        import uvloop
        return uvloop.new_event_loop()
    # The standard library's own loop, whatever loop policy someone installed (uvloop.install()).
    return asyncio.SelectorEventLoop() if sys.platform != "win32" else asyncio.new_event_loop()


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    """`uvloop` or `asyncio`: the kind of `loop` (said in the "serving" line)."""
    uv = sys.modules.get("uvloop")
    return UVLOOP if uv is not None and isinstance(loop, uv.Loop) else ASYNCIO


def start(ctx: Context, listen: str, tls: ServerTLS | None, behaviors: list[BehaviorInterceptor],
          monitor: DatabaseMonitor | None) -> LoopRunning:
    """Serve on `listen` (the transport already checked by server_main.start, which calls this)
    from a new event loop in a thread of its own; health SERVING once the port is open, then kept
    in step with the database by `monitor`."""
    try:
        loop = new_event_loop(ctx.settings.event_loop)  # first: a loop not installed is refused before any thread starts
    except EventLoopUnavailable as exc:
        raise SystemExit(str(exc)) from None
    pool = futures.ThreadPoolExecutor(max_workers=ctx.settings.max_workers, thread_name_prefix="rpc")
    streams = futures.ThreadPoolExecutor(max_workers=max(ctx.settings.stream_workers, 1),
                                         thread_name_prefix="rpc-stream")
    thread = threading.Thread(target=loop.run_forever, name="rpc-loop", daemon=True)
    thread.start()
    loop_writes = loop_write_methods(ctx)  # what the server does and what its "serving" line says, once
    on_stop: list[Callable[[], None]] = []
    ended_early = EndedEarly()

    async def open_port() -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
        # Made on the loop that runs it (a grpc.aio server belongs to the loop it is made on).
        server, health_servicer = build(ctx, pool, streams, inline_methods(ctx), behaviors, loop_writes, on_stop,
                                        ended_early)
        credentials = server_credentials(tls)
        port = add_port(server, listen, credentials)
        if port == 0:
            raise _CannotListen(f"cannot listen on {listen}")
        await server.start()
        await set_serving(health_servicer, True)
        return server, health_servicer, port

    try:
        server, health_servicer, port = _await_on(loop, thread, open_port())
    except BaseException as exc:
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        pool.shutdown(wait=False)
        streams.shutdown(wait=False)
        if isinstance(exc, _CannotListen):
            raise SystemExit(str(exc)) from None
        raise
    running = LoopRunning(loop, thread, server, health_servicer, port, monitor, (pool, streams), loop_writes,
                          tuple(on_stop), ended_early)
    if monitor is not None:
        monitor.start(running.set_serving)
    return running
