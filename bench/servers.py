"""Server processes. `serve(spec, conn)` is the target of a `spawn` process: it builds one server
model, answers ("ready", port, pid) on `conn`, serves until it receives "stop", then exits.

Models:
- sync:      entitlement.server_main.start(ctx, "127.0.0.1:0"), the real server, unchanged, in the
             model of spec.server_model (threads by default: the thread-pool server; bench.rpcs
             asks for each backend's production model);
- aio:       entitlement.aio_server.build(ctx, executor, streams, inline=nothing): the event-loop
             server with every call offloaded to thread pools of the same sizes (same servicers,
             each method wrapped once in the same behaviours);
- aio-inline: the same with the hot reads (entitlement.aio_server.HOT_READS) run on the event loop:
             the production event-loop server (ENTITLEMENT_SERVER_MODEL=event-loop, the default on
             SQLite), built here on the benchmark's loop (also on PostgreSQL, where production
             runs nothing on the loop, to show what a blocking round trip there costs);
- sync-echo: grpc.server built like server_main.start (same pool size and options), no
             interceptor, one bytes-in/bytes-out method /bench.Echo/Echo;
- aio-echo:  grpc.aio.server built like `aio`, the same echo method offloaded to the same pool;
- aio-echo-inline: the same, answered on the event loop (no thread hop), to show what the hop costs.
- loop-echo / loop-read (bench.readfloor): grpc.aio.server built like aio-echo-inline, answering
             the same two paths on the event loop: with the request's bytes (loop-echo); with them
             after the RPC's one hot read made from the loop (loop-read): on PostgreSQL its
             statement sent by libpq in non-blocking mode (prepared once per connection, values and
             rows through psycopg's adapters as ctx.db.hot does, on as many connections as the
             thread-pool server has pool threads, a call waiting for a free one), the loop awaiting
             the answer instead of a pool thread blocking on it; on SQLite the production read, run
             on the loop as the event-loop server runs it. What the event-loop server could reach on
             PostgreSQL, were its hot reads made that way (it hands them to its pool).
- floor-echo / floor-read / floor-handler (bench.readfloor): grpc.server built like sync-echo,
             its methods registered as the real server's are, answering the paths of
             CheckEligibility and VerifyEntitlement: with the request's bytes (floor-echo); with
             them after the RPC's one hot read, on the real database through `ctx.db.hot`
             (floor-read: the request decoded, for a check the person key's HMAC, the statement
             run; nothing else); with the servicer method wrapped in the caller's identity only
             (floor-handler: what the real server runs, less the access log and the rate limiter).

Several processes on one port (spec.processes > 1, a fixed spec.port): one serve() process each,
started as server.py starts its workers (spawn, then app.build and server_main.start, which turns
SO_REUSEPORT on when the settings say several processes); the sync echo does the same.

With spec.count_queries the sync server counts, on its engine (SQLAlchemy events, nothing changed in
entitlement/), the SQL statements sent, the transactions ended (commit, rollback) and the pool
checkouts of the transactional pool (no round trip: there is no pre-ping); on PostgreSQL also the
statements queued in psycopg's pipeline mode without a round trip of their own (sent while the
connection is in pipeline mode and reading no rows, or prefetched with an earlier read of the same
batch: entitlement/storage/direct.py), the BEGINs queued with a transaction's first statements, and
the transactions that ended in pipeline mode (leaving it after the COMMIT costs no round trip);
the message "counts" answers them.

Output (stdout, stderr and the JSON logs, which go to stderr as in production) goes to the log
file of the spec, never to the terminal.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import sys
import threading
import traceback
from concurrent import futures
from multiprocessing.connection import Connection
from typing import Any

from bench.config import (AIO, AIO_ECHO, AIO_ECHO_INLINE, AIO_INLINE, ECHO_SERVICE, FLOOR_ECHO, FLOOR_HANDLER,
                          FLOOR_KINDS, FLOOR_READ, LOOP_ECHO, LOOP_KINDS, NOW, PLATFORM_ID, SYNC, SYNC_ECHO,
                          ServerSpec)
from entitlement import affinity

OPTIONS = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)]


def _options(spec: ServerSpec) -> list[tuple[str, int]]:
    return [("grpc.so_reuseport", 1 if spec.processes > 1 else 0), *OPTIONS[1:]]


class QueryCounter:
    """SQL statements (on both of the Database's pools), transactions ended and pool checkouts
    (of the transactional pool; the autocommit pool of hot reads has neither), from any thread."""

    def __init__(self, db: Any) -> None:
        from sqlalchemy import event
        self.counts = {"statements": 0, "transactions": 0, "checkouts": 0, "queued": 0, "pipelines": 0,
                       "begins_joined": 0}
        self._lock = threading.Lock()
        for engine in (db.engine, db.reader):  # transactions, and the autocommit pool (Database.snapshot)
            event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(db.engine, "begin", self._began)
        db.hot.listeners.append(lambda _sql: self._add("statements"))  # the hot reads' DBAPI statements
        event.listen(db.engine, "commit", self._ended)
        event.listen(db.engine, "rollback", self._ended)
        event.listen(db.engine.pool, "checkout", lambda *a: self._add("checkouts"))

    @staticmethod
    def _pipelined(conn: Any) -> bool:
        from entitlement.storage.direct import in_pipeline
        return in_pipeline(conn.connection.driver_connection)

    @staticmethod
    def _began(conn: Any) -> None:
        conn.info["bench_fresh"] = True  # the transaction's first statement is still to come

    def _statement(self, conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool) -> None:
        from entitlement.storage.direct import COUNTED, PREFETCHED
        self._add("statements")
        pipelined = self._pipelined(conn)
        info = conn.info
        if info.pop("bench_fresh", False) and pipelined:
            self._add("begins_joined")  # psycopg queues BEGIN: it goes with this statement
        prefetched = context == PREFETCHED
        joins = prefetched and info.get("bench_batch", False)  # sent with the batch's first read
        info["bench_batch"] = prefetched
        head = statement.lstrip()[:6].upper()
        reads = head == "SELECT" or " RETURNING " in statement or context == COUNTED  # waited for
        if pipelined and (joins or not reads):
            self._add("queued")  # no round trip of its own: sent with a read, or the COMMIT

    def _ended(self, conn: Any) -> None:
        self._add("transactions")
        if self._pipelined(conn):
            self._add("pipelines")

    def _add(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def _serve_until_stop(conn: Connection, counter: QueryCounter | None) -> None:
    """Answer "counts" until "stop" (or the orchestrator going away)."""
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg != "counts":
            return
        conn.send(counter.snapshot() if counter is not None else {})


def serve(spec: ServerSpec, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the orchestrator stops us in order
    _redirect_output(spec)
    try:
        # Every server, ours and echo, pinned as server.py pins its processes (before any thread
        # starts; a refusal reaches the orchestrator as any other failure to start).
        affinity.apply(spec.cpu_affinity, spec.index, spec.processes)
        if spec.kind in (SYNC, SYNC_ECHO, *FLOOR_KINDS):
            _serve_sync(spec, conn)
        elif spec.kind in (AIO, AIO_INLINE, AIO_ECHO, AIO_ECHO_INLINE, *LOOP_KINDS):
            # On a loop of the kind the real event-loop server runs (spec.event_loop): the floor is
            # built the same way as ours.
            from entitlement.aio_server import new_event_loop
            with asyncio.Runner(loop_factory=lambda: new_event_loop(spec.event_loop)) as runner:
                runner.run(_serve_aio(spec, conn))
        else:
            raise ValueError(f"unknown server model {spec.kind!r}")
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise


def _redirect_output(spec: ServerSpec) -> None:
    """fds 1 and 2 to the log file (gRPC core writes there too), then the production logging set-up
    (logs.configure without a stream: JSON lines on stderr, loggers cached)."""
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (lives as long as the process)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    from entitlement import logs
    logs.configure(spec.log_level)


def _context(spec: ServerSpec) -> Any:
    from entitlement import app
    from entitlement.clock import FixedClock
    return app.build(spec.settings(), clock=FixedClock(NOW))


def _echo(request: bytes, context: Any) -> bytes:
    return request


SWITCH_INTERVAL_EVENT = "bench_switch_interval"


def _switch_interval(spec: ServerSpec) -> None:
    """bench.mixed's experiment: the interpreter's switch interval, when the spec sets one (server.py
    leaves Python's own, 5 ms)."""
    if spec.switch_interval_us:
        sys.setswitchinterval(spec.switch_interval_us / 1_000_000)
        # Read back into the server's log: bench.mixed checks that the server runs with it.
        print(json.dumps({"event": SWITCH_INTERVAL_EVENT, "us": round(sys.getswitchinterval() * 1_000_000)}),
              file=sys.stderr, flush=True)


def _serve_sync(spec: ServerSpec, conn: Connection) -> None:
    import grpc
    if spec.kind == SYNC:
        from entitlement.server_main import start, tune_gc
        ctx = _context(spec)
        counter = QueryCounter(ctx.db) if spec.count_queries else None
        tune_gc()  # as server.py (serve_forever): without it, the default collector's full collections
        # (tens of ms over every unfrozen object) were most of ListActivations' p99 at half rate
        _switch_interval(spec)
        running = start(ctx, ctx.settings.listen)
        conn.send(("ready", running.port, os.getpid()))
        _serve_until_stop(conn, counter)
        running.stop(0)
        ctx.db.dispose()
        return
    # The same bound as server_main.start's.
    from entitlement.config import Settings
    from entitlement.server_main import max_concurrent_rpcs, tune_gc
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=spec.workers, thread_name_prefix="rpc"),
                         options=_options(spec),
                         maximum_concurrent_rpcs=max_concurrent_rpcs(spec.workers, Settings().stream_workers))
    ctx, counter = None, None
    if spec.kind == SYNC_ECHO:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),))
    else:
        ctx = None if spec.kind == FLOOR_ECHO else _context(spec)
        counter = QueryCounter(ctx.db) if ctx is not None else None  # (bench.readfloor: SQL per call)
        if spec.kind == FLOOR_HANDLER:
            _serve_floor_handler(server, ctx)
        for service, handlers in _floor_handlers(spec.kind, ctx).items():
            # Registered with gRPC core as the generated code registers ours (the real server's
            # dispatch), not looked up through a generic handler.
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
            server.add_registered_method_handlers(service, handlers)
    port = server.add_insecure_port(f"127.0.0.1:{spec.port}")
    if port == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{spec.port}")
    tune_gc()  # the floor built as ours is, its collector tuning included
    _switch_interval(spec)
    server.start()
    conn.send(("ready", port, os.getpid()))
    try:
        _serve_until_stop(conn, counter)
        server.stop(0).wait()
    finally:
        if ctx is not None:
            ctx.db.dispose()


def _floor_handlers(kind: str, ctx: Any) -> dict[str, dict[str, Any]]:
    """bench.readfloor's bare handlers (module docstring), by service and method name (none for
    floor-handler, whose services are registered as the real server's: _serve_floor_handler)."""
    import grpc

    from entitlement import registry
    from entitlement.activation import _VERIFY
    from entitlement.v1 import activation_pb2, eligibility_pb2
    check, verify = "entitlement.v1.EligibilityService", "entitlement.v1.ActivationService"
    if kind == FLOOR_ECHO:
        return {check: {"CheckEligibility": grpc.unary_unary_rpc_method_handler(_echo)},
                verify: {"VerifyEntitlement": grpc.unary_unary_rpc_method_handler(_echo)}}
    if kind == FLOOR_READ:
        def read_check(request: bytes, context: Any) -> bytes:
            who = eligibility_pb2.CheckEligibilityRequest.FromString(request).job_seeker
            b = who.birth_date
            registry.lookup(ctx.db.hot, ctx.pseudo.person_key(who.agency_id), dt.date(b.year, b.month, b.day))
            return request

        def read_verify(request: bytes, context: Any) -> bytes:
            account = activation_pb2.VerifyEntitlementRequest.FromString(request).account_id
            ctx.db.hot.all(_VERIFY, {"platform": PLATFORM_ID, "account": account})
            return request
        return {check: {"CheckEligibility": grpc.unary_unary_rpc_method_handler(read_check)},
                verify: {"VerifyEntitlement": grpc.unary_unary_rpc_method_handler(read_verify)}}
    if kind != FLOOR_HANDLER:
        raise ValueError(f"unknown floor server {kind!r}")
    return {}  # (served by _serve_floor_handler)


def _serve_floor_handler(server: Any, ctx: Any) -> None:
    """floor-handler: the two services registered exactly as server_main.start registers them
    (the generated functions through WrappingRegistrar), wrapped in the caller's identity only."""
    from entitlement.api.identity import CallerInterceptor
    from entitlement.api.servicers import ActivationServicer, EligibilityServicer
    from entitlement.api.wrapping import WrappingRegistrar
    from entitlement.v1 import activation_pb2_grpc, eligibility_pb2_grpc
    ours = WrappingRegistrar(server, [CallerInterceptor(ctx.callers, client_certificates=False)])  # no mutual TLS
    eligibility_pb2_grpc.add_EligibilityServiceServicer_to_server(EligibilityServicer(ctx), ours)
    activation_pb2_grpc.add_ActivationServiceServicer_to_server(ActivationServicer(ctx), ours)


def aio_echo(workers: int, executor: futures.Executor | None) -> Any:
    """The grpc.aio echo server (not started; call on the loop that is to run it), bounded as
    server_main.start bounds ours: answered on the loop (executor None: the event-loop server's
    floor, aio-echo-inline) or handed to `executor` (aio-echo)."""
    import grpc
    from entitlement.config import Settings
    from entitlement.server_main import max_concurrent_rpcs

    async def echo(request: bytes, context: Any) -> bytes:
        if executor is None:
            return request
        return await asyncio.get_running_loop().run_in_executor(executor, _echo, request, None)
    server = grpc.aio.server(options=OPTIONS, maximum_concurrent_rpcs=max_concurrent_rpcs(
        workers, Settings().stream_workers))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    return server


async def _serve_aio(spec: ServerSpec, conn: Connection) -> None:
    from entitlement.config import Settings
    from entitlement.server_main import tune_gc
    loop = asyncio.get_running_loop()
    executor = futures.ThreadPoolExecutor(max_workers=spec.workers, thread_name_prefix="rpc")
    streams = futures.ThreadPoolExecutor(max_workers=max(Settings().stream_workers, 1), thread_name_prefix="rpc-stream")
    ctx, counter, reads = None, None, None
    if spec.kind in (AIO, AIO_INLINE):
        from entitlement import aio_server
        ctx = _context(spec)
        server, health_servicer = aio_server.build(
            ctx, executor, streams, aio_server.HOT_READS if spec.kind == AIO_INLINE else frozenset())
    elif spec.kind in LOOP_KINDS:
        if spec.kind != LOOP_ECHO:
            ctx = _context(spec)
            counter = QueryCounter(ctx.db)
            reads = _LoopReads(ctx, spec.workers)
        server = _loop_floor(spec, ctx, reads)
    else:
        server = aio_echo(spec.workers, None if spec.kind == AIO_ECHO_INLINE else executor)
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        raise SystemExit("cannot listen on 127.0.0.1:0")
    tune_gc()  # every model, ours and echo, with the collector tuning of server.py
    _switch_interval(spec)
    await server.start()
    if spec.kind in (AIO, AIO_INLINE):
        await aio_server.set_serving(health_servicer)
    conn.send(("ready", port, os.getpid()))
    # A dedicated thread waits for "stop" so the event loop stays free (and the RPC pool untouched).
    waiter = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="control")
    await loop.run_in_executor(waiter, _serve_until_stop, conn, counter)
    await server.stop(0)
    if reads is not None:
        reads.close()
    executor.shutdown(wait=True)
    streams.shutdown(wait=True)
    waiter.shutdown(wait=False)
    if ctx is not None:
        ctx.db.dispose()


class _LoopReads:
    """loop-read's hot reads (module docstring): one statement made from the event loop. On
    PostgreSQL through libpq in non-blocking mode on `size` connections of the reader engine (the
    connections ctx.db.hot makes, one per pool thread there), each statement prepared once per
    connection, its values dumped and its rows loaded by psycopg's adapters, as
    entitlement.storage.hotread does; the loop waits for the socket instead of a thread blocking on
    it. On SQLite the production read (ctx.db.hot), on the loop as the event-loop server runs it."""

    def __init__(self, ctx: Any, size: int) -> None:
        self.ctx = ctx
        self.hot = ctx.db.hot
        self.pg = ctx.db.dialect == "postgresql"
        self.free: list[tuple[Any, Any, dict[Any, bytes]]] = []
        self.waiting: Any = None
        self._waiters: dict[int, Any] = {}  # socket -> the future of the statement waiting on it
        self._by_fd: dict[int, tuple[Any, Any, dict[Any, bytes]]] = {}
        self._conns: list[tuple[Any, Any, dict[Any, bytes]]] = []
        if self.pg:
            import collections
            self.waiting = collections.deque()
            self.free = [self._open() for _ in range(size)]
            self._conns = list(self.free)

    async def all(self, stmt: Any, params: dict[str, Any]) -> list[Any]:
        if not self.pg:
            return list(self.hot.all(stmt, params))
        p = self.hot.prepare(stmt)
        for listener in self.hot.listeners:  # counted as ctx.db.hot counts its statements
            listener(p.sql)
        loop = asyncio.get_running_loop()
        slot = await self._take(loop)
        ok = False
        try:
            rows = await self._run(loop, slot, p, p.parameters(params))
            ok = True
        finally:
            # A connection left mid-statement (an error, the call cancelled) is replaced, not reused.
            self._give(slot if ok else self._replace(loop, slot))
        return [p.convert(r) for r in rows]

    async def _take(self, loop: Any) -> tuple[Any, Any, dict[Any, bytes]]:
        if self.free:
            return self.free.pop()
        wait = loop.create_future()
        self.waiting.append(wait)
        try:
            return await wait  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            if wait.done() and not wait.cancelled():  # handed a connection as it was cancelled
                self._give(wait.result())
            raise

    def _give(self, slot: tuple[Any, Any, dict[Any, bytes]]) -> None:
        while self.waiting:
            wait = self.waiting.popleft()
            if not wait.done():  # (a waiter cancelled meanwhile is skipped)
                wait.set_result(slot)
                return
        self.free.append(slot)

    def _open(self) -> tuple[Any, Any, dict[Any, bytes]]:
        from psycopg.adapt import Transformer
        fairy = self.hot._reader.raw_connection()  # the reader engine's connect parameters
        conn = fairy.dbapi_connection
        fairy.detach()
        conn.pgconn.nonblocking = 1
        slot: tuple[Any, Any, dict[Any, bytes]] = (conn, Transformer(conn), {})
        self._by_fd[conn.pgconn.socket] = slot
        return slot

    def _replace(self, loop: Any, slot: tuple[Any, Any, dict[Any, bytes]]) -> tuple[Any, Any, dict[Any, bytes]]:
        conn = slot[0]
        fd = conn.pgconn.socket
        if self._waiters.pop(fd, "none") != "none":
            loop.remove_reader(fd)
        self._by_fd.pop(fd, None)
        conn.close()
        self._conns.remove(slot)
        fresh = self._open()
        self._conns.append(fresh)
        return fresh

    async def _run(self, loop: Any, slot: tuple[Any, Any, dict[Any, bytes]], p: Any, args: Any) -> list[Any]:
        from psycopg import pq
        from psycopg.adapt import PyFormat
        conn, tx, names = slot
        pgconn = conn.pgconn
        sql, order = p.numbered()
        values = tx.dump_sequence([args[n] for n in order], [PyFormat.TEXT] * len(order)) if order else None
        key = (p, tuple(tx.types or ()) if order else ())
        name = names.get(key)
        if name is None:  # once per connection and statement: prepared and waited for
            name = f"loop_{len(names)}".encode()
            pgconn.send_prepare(name, sql, key[1] or None)
            prepared = await self._result(loop, pgconn)
            if prepared is None or prepared.status != pq.ExecStatus.COMMAND_OK:
                raise RuntimeError("loop-read: PREPARE failed: "
                                   + (prepared.error_message.decode(errors="replace") if prepared else "no result"))
            names[key] = name
        pgconn.send_query_prepared(name, values)
        result = await self._result(loop, pgconn)
        if result is None or result.status != pq.ExecStatus.TUPLES_OK:
            raise RuntimeError("loop-read: " + (result.error_message.decode(errors="replace") if result else "no result"))
        if not result.ntuples:
            return []
        tx.set_pgresult(result)
        rows: list[Any] = tx.load_rows(0, result.ntuples, tuple)
        tx.set_pgresult(None)
        return rows

    async def _result(self, loop: Any, pgconn: Any) -> Any:
        """The last result of the statement sent (libpq ends each with a None). Each connection's
        socket is watched by the loop from its first statement on (one reader each, kept: adding and
        removing it per statement costs two epoll_ctl calls a read), which wakes the statement
        waiting on it."""
        while pgconn.flush():  # (a statement this small is sent whole at once)
            await asyncio.sleep(0)
        fd = pgconn.socket
        if fd not in self._waiters:
            self._waiters[fd] = None
            loop.add_reader(fd, self._readable, fd)
        last = None
        while True:
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    return last
                last = result
            ready = self._waiters[fd] = loop.create_future()
            try:
                await ready
            finally:
                self._waiters[fd] = None

    def _readable(self, fd: int) -> None:
        ready = self._waiters.get(fd)
        if ready is not None and not ready.done():
            self._waiters[fd] = None
            ready.set_result(None)
            return
        slot = self._by_fd.get(fd)  # nobody waits (a notice between statements): into libpq's buffer
        if slot is not None:
            slot[0].pgconn.consume_input()

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self._waiters:
            loop.remove_reader(fd)
        for conn, _tx, _names in self._conns:
            conn.close()


def _loop_floor(spec: ServerSpec, ctx: Any, reads: _LoopReads | None) -> Any:
    """loop-echo / loop-read (module docstring): built like aio-echo-inline (options, concurrency
    bound), answering CheckEligibility's and VerifyEntitlement's paths on the loop."""
    import grpc

    from entitlement import registry
    from entitlement.activation import _VERIFY
    from entitlement.config import Settings
    from entitlement.server_main import max_concurrent_rpcs
    from entitlement.v1 import activation_pb2, eligibility_pb2

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def read_check(request: bytes, context: Any) -> bytes:
        who = eligibility_pb2.CheckEligibilityRequest.FromString(request).job_seeker
        stmt, params = registry.lookup_read(ctx.pseudo.person_key(who.agency_id))
        await reads.all(stmt, params)  # type: ignore[union-attr]
        return request

    async def read_verify(request: bytes, context: Any) -> bytes:
        account = activation_pb2.VerifyEntitlementRequest.FromString(request).account_id
        await reads.all(_VERIFY, {"platform": PLATFORM_ID, "account": account})  # type: ignore[union-attr]
        return request

    check, verify = (echo, echo) if reads is None else (read_check, read_verify)
    server = grpc.aio.server(options=OPTIONS, maximum_concurrent_rpcs=max_concurrent_rpcs(
        spec.workers, Settings().stream_workers))
    for service, method, fn in (("entitlement.v1.EligibilityService", "CheckEligibility", check),
                                ("entitlement.v1.ActivationService", "VerifyEntitlement", verify)):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            service, {method: grpc.unary_unary_rpc_method_handler(fn)}),))
    return server
