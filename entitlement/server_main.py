"""Building and running the gRPC server (used by the top-level server.py and by the tests)."""

from __future__ import annotations

import gc
import signal
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from entitlement import affinity, hostcheck
from entitlement.api.accesslog import AccessLogInterceptor
from entitlement.api import public, ratelimit
from entitlement.api.identity import CallerInterceptor
from entitlement.api.wrapping import BehaviorInterceptor, WrappingRegistrar
from entitlement.api.servicers import ActivationServicer, AuditServicer, EligibilityServicer, RegistryServicer
from entitlement.app import Context
from entitlement.config import EVENT_LOOP, Settings, resolve_server_model
from entitlement.dbhealth import DatabaseMonitor, monitor_for
from entitlement.tls import ServerTLS, check_transport, server_tls
from entitlement.v1 import (activation_pb2, activation_pb2_grpc, audit_pb2, audit_pb2_grpc, eligibility_pb2,
                            eligibility_pb2_grpc, registry_pb2, registry_pb2_grpc)

SERVICE_NAMES = (
    eligibility_pb2.DESCRIPTOR.services_by_name["EligibilityService"].full_name,
    activation_pb2.DESCRIPTOR.services_by_name["ActivationService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
)
log = structlog.get_logger("entitlement.server")


class Serving(Protocol):
    """A started server of either model (Running here, entitlement.aio_server.LoopRunning)."""

    port: int
    monitor: DatabaseMonitor | None

    @property
    def event_loop(self) -> str | None:
        """uvloop | asyncio for the event-loop model; None for the thread pool, which runs no loop."""

    @property
    def loop_writes(self) -> frozenset[str]:
        """The methods whose writes run on the event loop when they need not wait (none in the thread pool)."""

    @property
    def server(self) -> Any: ...

    def set_serving(self, serving: bool) -> None: ...

    def stop(self, grace: float) -> None: ...

    def failure(self) -> str | None:
        """Why this server can no longer answer, though its process runs; None while it can."""


@dataclass
class Running:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    monitor: DatabaseMonitor | None = None  # keeps health in step with the database (entitlement/dbhealth.py)
    stream_pool: futures.ThreadPoolExecutor | None = None  # the streaming calls' threads
    event_loop: str | None = None  # the thread-pool model runs no event loop (aio_server.LoopRunning's is named)
    loop_writes: frozenset[str] = frozenset()  # nor writes on one (aio_server.loop_write_methods)
    extra_pools: tuple[futures.ThreadPoolExecutor, ...] = ()  # reflection's (entitlement/api/public.py)
    # Called as the stop begins: the change and log streams end then (the servicers' stop_streams).
    on_stop: tuple[Callable[[], None], ...] = ()

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def stop(self, grace: float) -> None:
        """Graceful stop: health NOT_SERVING first (load balancers drain), the change and log
        streams ended (change streams never finish by themselves), then refuse new calls and let calls in flight finish
        within `grace` seconds."""
        if self.monitor is not None:
            self.monitor.stop()  # first: no ping may set SERVING again
        self.set_serving(False)
        for stopping in self.on_stop:
            stopping()
        self.server.stop(grace).wait()
        for pool in (self.stream_pool, *self.extra_pools):
            if pool is not None:
                pool.shutdown(wait=False)  # its calls were ended with the server's

    def failure(self) -> str | None:
        return None  # gRPC's sync server tells nothing of its threads (a health probe would)


def max_concurrent_rpcs(unary_workers: int, stream_workers: int, configured: int = 0) -> int:
    """Calls accepted at once, those waiting for a thread included (beyond: RESOURCE_EXHAUSTED,
    answered by gRPC itself before any handler): `configured` (ENTITLEMENT_MAX_CONCURRENT_RPCS)
    when set, else 8 per thread of the two pools."""
    return configured if configured > 0 else (unary_workers + stream_workers) * 8


def concurrency_limit(settings: Settings) -> int:
    """The limit a server process with these settings enforces (max_concurrent_rpcs above)."""
    return max_concurrent_rpcs(settings.max_workers, settings.stream_workers, settings.max_concurrent_rpcs)


def call_behaviors(ctx: Context, monitor: DatabaseMonitor | None = None,
                   client_certificates: bool = False) -> list[BehaviorInterceptor]:
    """What runs around every call of our services, the first outermost (entitlement.api.wrapping):
    the access log, the caller's identity, then the rate limit when one is set."""
    behaviors: list[BehaviorInterceptor] = [
        AccessLogInterceptor(on_outage=monitor.outage_seen if monitor else None),
        CallerInterceptor(ctx.callers, client_certificates=client_certificates)]
    limiter = ratelimit.interceptor(ctx.settings.check_rate_per_min, ctx.settings.check_burst)
    if limiter is not None:  # after the caller's: buckets are per authenticated caller
        behaviors.append(limiter)
    return behaviors


def server_model(ctx: Context) -> str:
    """The server model of this context (ENTITLEMENT_SERVER_MODEL, `auto` resolved by its database)."""
    return resolve_server_model(ctx.settings.server_model, ctx.db.dialect == "sqlite")


def server_options(settings: Settings) -> list[tuple[str, int]]:
    # Several server processes share one port through SO_REUSEPORT (the kernel spreads
    # connections); a single process keeps it off so that a port in use is an error.
    return [("grpc.so_reuseport", 1 if settings.processes > 1 else 0),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            # Dead clients found by HTTP/2 pings (config.py `keepalive_seconds`), only while calls are open.
            ("grpc.keepalive_time_ms", settings.keepalive_seconds * 1000),
            ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_seconds * 1000),
            # (gRPC core stops pinging after 2 pings with no data frame sent meanwhile: an idle change
            # stream sends none, so without this its dead client would be found by no ping at all.)
            ("grpc.http2.max_pings_without_data", 0),
            # The wait for a ping's answer that gRPC core (1.85) actually applies: one minute by default
            # whatever keepalive_timeout_ms says (the argument of chttp2's internal.h; checked by
            # tests/test_watch.py's vanished-client test, which fails without it).
            ("grpc.http2.ping_timeout_ms", settings.keepalive_timeout_seconds * 1000)]


def server_credentials(tls: ServerTLS | None) -> grpc.ServerCredentials | None:
    """TLS credentials of the settings' certificate (mutual when a client CA is given), or None."""
    if tls is None:
        return None
    return grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.client_ca,
                                       require_client_auth=tls.client_ca is not None)


def add_port(server: Any, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    """The port bound on `listen`, or 0 when it cannot be (in use, an address not of this host):
    grpcio raises RuntimeError for that, which reached the operator as a traceback."""
    try:
        if credentials is None:
            return int(server.add_insecure_port(listen))
        return int(server.add_secure_port(listen, credentials))
    except RuntimeError:
        return 0


def start(ctx: Context, listen: str) -> Serving:
    """Serve on `listen` with the settings' server model: TLS (mutual with a client CA) when the
    settings give a certificate; plaintext only on a loopback address or with `insecure`
    (entitlement.tls.TransportError otherwise)."""
    tls = server_tls(ctx.settings.tls_cert_file, ctx.settings.tls_key_file, ctx.settings.tls_client_ca_file)
    check_transport(listen, tls, ctx.settings.insecure)
    monitor = monitor_for(ctx.db, ctx.settings.db_ping_ms, ctx.settings.db_ping_timeout_ms)
    # Without a client CA the server asks for no certificate: no call can carry one.
    behaviors = call_behaviors(ctx, monitor, client_certificates=tls is not None and bool(ctx.settings.tls_client_ca_file))
    if server_model(ctx) == EVENT_LOOP:
        from entitlement import aio_server
        return aio_server.start(ctx, listen, tls, behaviors, monitor)
    # Streaming calls (change streams, log streams, registry imports) hold a thread while they last:
    # they get threads of their own, and the server's pool serves the unary calls only, so it can
    # stay small (fewer threads fight less over the interpreter lock: docs/PERFORMANCE-LOG.md).
    stream_pool = futures.ThreadPoolExecutor(max_workers=max(ctx.settings.stream_workers, 1),
                                             thread_name_prefix="rpc-stream")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=ctx.settings.max_workers, thread_name_prefix="rpc"),
        options=server_options(ctx.settings),
        maximum_concurrent_rpcs=concurrency_limit(ctx.settings),
    )
    # Our services' methods are wrapped once in the behaviours (not server interceptors: see
    # entitlement.api.wrapping); health and reflection are served bare.
    ours = WrappingRegistrar(server, behaviors, stream_pool)
    eligibility_pb2_grpc.add_EligibilityServiceServicer_to_server(EligibilityServicer(ctx), ours)
    activations = ActivationServicer(ctx)
    activation_pb2_grpc.add_ActivationServiceServicer_to_server(activations, ours)
    audits = AuditServicer(ctx)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(audits, ours)
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(ctx), ours)
    health_servicer = public.Health()  # grpc's, without its deadlock (entitlement/api/public.py)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Reflection's streams on a pool of their own, capped (entitlement/api/public.py): open ones
    # held the unary calls' threads.
    reflection_pool = public.add_reflection(server, (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            ctx.settings.public_streams)
    credentials = server_credentials(tls)
    port = add_port(server, listen, credentials)
    if port == 0:
        raise SystemExit(f"cannot listen on {listen}")
    server.start()
    running = Running(server, health_servicer, port, monitor, stream_pool, extra_pools=(reflection_pool,),
                      on_stop=(activations.stop_streams, audits.stop_streams))
    running.set_serving(True)
    if monitor is not None:
        monitor.start(running.set_serving)
    return running


def tune_gc() -> None:
    """Everything loaded at start (modules, programs, compiled statements) is kept for the life of
    the process: move it out of the collector's sight, and collect the youngest generation less
    often. A call allocates a few thousand short-lived objects, freed by reference counting; with
    the default threshold (700) the cyclic collector ran every few calls and walked them."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def serve_forever(ctx: Context) -> None:
    requested: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Only noted here: the main loop below stops the server, once. (Stopping inside the handler
        # let a second signal, handled in the middle of the first one's stop, start another.)
        if not requested:
            log.info("stopping", signal=signal.Signals(signum).name, grace_seconds=ctx.settings.grace_seconds)
        requested.append(signum)

    # Before the server starts: a signal while it starts is noted, and it stops as soon as it runs.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tune_gc()
    running = start(ctx, ctx.settings.listen)
    s = ctx.settings
    log.info("serving", listen=s.listen, port=running.port, database=ctx.db.dialect, server_model=server_model(ctx),
             event_loop=running.event_loop, loop_writes=sorted(running.loop_writes),
             programs=[p.id for p in ctx.catalog.all()],
             transport="mtls" if s.tls_client_ca_file else "tls" if s.tls_cert_file else "plaintext",
             check_rate_per_min=s.check_rate_per_min, callers_file=s.callers_file.exists(),
             max_concurrent_rpcs=concurrency_limit(s),
             cpus=affinity.cpus_of("self"))
    transport_warning = hostcheck.database_transport_warning(ctx.db.url)
    if transport_warning is not None:
        log.warning("loopback_tcp_stalls", **transport_warning)
    # A process-directed signal may be delivered to any thread (gRPC's, the workers'); Python runs
    # the handler only when the main thread executes bytecode, which an untimed wait never does.
    # Wait in short slices so SIGTERM is always handled promptly.
    # The server failing under a running process (the event loop's thread ended) stops the process
    # with an error, so that what runs it (systemd, Kubernetes; server.py's supervisor stops the
    # other processes and exits non-zero) starts it again at once, without waiting for health
    # probes to fail.
    failure = None
    while not requested and failure is None:
        time.sleep(0.2)
        failure = running.failure()
    if failure is not None:
        log.error("server_failed", reason=failure)
    try:
        running.stop(ctx.settings.grace_seconds)
    finally:
        ctx.db.dispose()
        # Stopped: a signal from now on changes nothing either. (The interpreter's finalization puts
        # SIGINT's default action back: a second Ctrl-C, or a supervisor's signal to the group,
        # landing while the process ended killed it, exit -2 after a clean stop. An ignored signal
        # stays ignored.)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log.info("stopped")
    if failure is not None:
        raise SystemExit(1)
