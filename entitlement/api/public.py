"""Health and reflection: the services anyone may call, without credentials (load balancers'
probes, `grpcurl`), with a bound on the streams they can hold open.

Why: both have a stream a client may keep open as long as it likes (Health.Watch, and reflection's
ServerReflectionInfo), and nothing authenticates it. Unbounded, an anonymous client holding enough
of them locked every caller out (found by a review): on the event loop each open stream counts
against the process's concurrent-call limit (ENTITLEMENT_MAX_CONCURRENT_RPCS: 96 open watches and
every call answered RESOURCE_EXHAUSTED), and on the thread pool each reflection stream held one of
the unary calls' threads (4 of them and every check waited). Now each kind is capped at
`ENTITLEMENT_PUBLIC_STREAMS` open at once per process; one more is refused RESOURCE_EXHAUSTED at
once. Reflection streams of the thread-pool server run on a small pool of their own (one thread
more than the cap, so that one beyond it is refused rather than queued). The thread-pool server's
Health.Watch holds nothing (grpc's non-blocking watch: no thread, no call slot) and is not capped.
Health.Check is unary and never capped. The thread-pool server's health is grpc's without the
deadlock of its status updates (`Health`)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2


def _refusal(kind: str, limit: int) -> str:
    return (f"this server already holds {limit} open {kind} (ENTITLEMENT_PUBLIC_STREAMS); close one, "
            f"or retry later")


class Health(health.HealthServicer):  # type: ignore[misc]  # (grpc_health, grpc_reflection: untyped)
    """The thread-pool server's health: grpc's, without its deadlock.

    grpc_health's `set` sends the new status to every watcher while holding the servicer's lock, and
    each send waits for its completion, which the server's event thread delivers; that same thread
    runs a closed watch's close callback, which takes the lock to forget the watcher. A watcher
    closing while a status is sent (a client going away as the database monitor flips health, or
    as the server stops) stopped that thread for good, and with it every call of the process; Check,
    which takes the lock too, waited behind it (found as a hang of a test's server stop in CI).
    Here statuses are sent outside that lock, one `set` after another (`_sends`, never taken by
    the event thread), so watchers still see them in order."""

    _gracefully_shutting_down: bool  # (grpc_health's)

    def __init__(self) -> None:
        super().__init__()
        self._sends = threading.Lock()

    def Watch(self, request: Any, context: grpc.ServicerContext, send_response_callback: Any = None) -> Any:
        if send_response_callback is None:  # a server without non-blocking streams: grpc's own
            return super().Watch(request, context)
        service = request.service
        with self._sends:
            with self._lock:
                status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                self._send_response_callbacks.setdefault(service, set()).add(send_response_callback)
            if not context.add_callback(self._on_close_callback(send_response_callback, service)):
                with self._lock:  # ended already: its close callback will never run
                    self._send_response_callbacks[service].discard(send_response_callback)
                return None
            send_response_callback(health_pb2.HealthCheckResponse(status=status))
        return None

    def set(self, service: str, status: Any) -> None:
        with self._sends:
            with self._lock:
                if self._gracefully_shutting_down:
                    return
                self._server_status[service] = status
                watchers = list(self._send_response_callbacks.get(service, ()))
            for send in watchers:  # (a watcher closed meanwhile: its send fails at once)
                send(health_pb2.HealthCheckResponse(status=status))

    def enter_graceful_shutdown(self) -> None:
        with self._sends:
            with self._lock:
                if self._gracefully_shutting_down:
                    return
                services = list(self._server_status)
        for service in services:
            self.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        with self._lock:
            self._gracefully_shutting_down = True


class CappedReflection(reflection.ReflectionServicer):  # type: ignore[misc]  # (grpc_health, grpc_reflection: untyped)
    """The thread-pool server's reflection, at most `limit` streams open at once."""

    def __init__(self, service_names: tuple[str, ...], limit: int) -> None:
        super().__init__(service_names)
        self._limit = limit
        self._open = threading.BoundedSemaphore(limit)

    def ServerReflectionInfo(self, request_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if not self._open.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _refusal("reflection streams", self._limit))
        try:
            yield from super().ServerReflectionInfo(request_iterator, context)
        finally:
            self._open.release()


def add_reflection(server: grpc.Server, service_names: tuple[str, ...], limit: int) -> futures.ThreadPoolExecutor:
    """Reflection on the thread-pool server, on a pool of its own (returned: shut it down with the
    server)."""
    pool = futures.ThreadPoolExecutor(max_workers=limit + 1, thread_name_prefix="rpc-reflection")
    method = CappedReflection(service_names, limit).ServerReflectionInfo

    def on_pool(request_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return method(request_iterator, context)
    on_pool.experimental_thread_pool = pool  # type: ignore[attr-defined]
    handler = grpc.stream_stream_rpc_method_handler(
        on_pool, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        reflection.SERVICE_NAME, {"ServerReflectionInfo": handler}),))
    return pool


class CappedAioReflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]  # (grpc_health, grpc_reflection: untyped)
    """The event-loop server's reflection, at most `limit` streams open at once (on the loop: no lock)."""

    def __init__(self, service_names: tuple[str, ...], limit: int) -> None:
        super().__init__(service_names)
        self._limit = limit
        self._count = 0

    async def ServerReflectionInfo(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        if self._count >= self._limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _refusal("reflection streams", self._limit))
        self._count += 1
        try:
            async for response in super().ServerReflectionInfo(request_iterator, context):
                yield response
        finally:
            self._count -= 1


class CappedAioHealth(health.aio.HealthServicer):  # type: ignore[misc]  # (grpc_health, grpc_reflection: untyped)
    """The event-loop server's health, at most `limit` Watch streams open at once."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit
        self._count = 0

    async def Watch(self, request: Any, context: Any) -> None:
        if self._count >= self._limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _refusal("health watches", self._limit))
        self._count += 1
        try:
            await super().Watch(request, context)
        finally:
            self._count -= 1
