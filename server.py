"""Run the entitlement gRPC server. Every setting comes from ENTITLEMENT_* environment variables
(README "Configuration"). `make run` prepares a local demo and runs this.

With ENTITLEMENT_PROCESSES=N (N > 1, for PostgreSQL deployments) this process supervises N server
processes sharing the port through SO_REUSEPORT (each pinned to a CPU of its own when N is the
number of CPUs it may run on: ENTITLEMENT_CPU_AFFINITY, entitlement/affinity.py). They are started with `spawn`, so no gRPC object
exists before they start; SIGTERM or SIGINT is passed on to each (each drains gracefully; each gets SIGTERM too when the
supervisor itself dies, even by kill -9: Linux; a stop asked while they still start ends them
at once, exit 0), and if
one ends unasked (killed, failed, or stopped alone by a signal sent to it, exit 0 then) it is logged
(`worker_ended`), the others are stopped and the supervisor exits non-zero.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
import time
from types import FrameType

import structlog

from entitlement import affinity, app, logs, registry_feed
from entitlement.config import EVENT_LOOP, EventLoopUnavailable, Settings, resolve_event_loop
from entitlement.programs import ProgramFileError
from entitlement.server_main import serve_forever, server_model
from entitlement.storage.db import describe_failure
from entitlement.storage.migrate import SchemaNotCurrent
from entitlement.tls import TransportError, check_transport, server_tls


def _prepare(settings: Settings) -> app.Context | int:
    """The context to serve, or the exit code of a start refused in one line on stderr: 2 for a
    configuration to fix, 1 for a database that cannot be reached or opened."""
    try:
        # Transport first: an unsafe listen address is refused before anything is loaded.
        check_transport(settings.listen, server_tls(settings.tls_cert_file, settings.tls_key_file,
                                                    settings.tls_client_ca_file), settings.insecure)
        ctx = app.build(settings)
        if server_model(ctx) == EVENT_LOOP:
            try:
                resolve_event_loop(settings.event_loop)  # the loop asked for is installed
            except EventLoopUnavailable:
                ctx.db.dispose()
                raise
        return ctx
    except (ProgramFileError, SchemaNotCurrent, TransportError, EventLoopUnavailable) as exc:
        print(f"entitlement: cannot start: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the database down, or the URL wrong: one line, as the CLI says it
        message = describe_failure(exc, settings.database_url)
        if message is None:
            raise
        print(f"entitlement: cannot start: {message}", file=sys.stderr)
        return 1


def _stop_with(supervisor: int) -> None:
    """This server process gets SIGTERM (drains, as if the supervisor had passed it on) when its
    supervisor dies, even by kill -9: else it went on serving the port unsupervised, beside any
    server.py started again (SO_REUSEPORT). Linux (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != supervisor:  # it died before that was set
        raise SystemExit(1)


def _child(index: int, supervisor: int) -> None:
    _stop_with(supervisor)
    settings = Settings.from_env()
    affinity.apply(settings.cpu_affinity, index, settings.processes)  # before any thread starts
    logs.configure(settings.log_level)
    ctx = _prepare(settings)
    if isinstance(ctx, int):
        raise SystemExit(ctx)
    serve_forever(ctx)


# The exit codes of a server process stopped as the supervisor asked (see _supervise).
_STOPPED_AS_ASKED = (0, -signal.SIGTERM, -signal.SIGINT)


def _supervise(settings: Settings) -> int:
    if settings.listen.rsplit(":", 1)[-1] == "0":
        print("entitlement: cannot start: ENTITLEMENT_PROCESSES > 1 needs a fixed port in ENTITLEMENT_LISTEN",
              file=sys.stderr)
        return 2
    affinity.choose(settings.cpu_affinity, 0, settings.processes)  # a CPU not available: refused here, once
    ctx = _prepare(settings)  # fail fast, once, on a bad configuration
    if isinstance(ctx, int):
        return ctx
    ctx.db.dispose()
    spawn = multiprocessing.get_context("spawn")
    children = [spawn.Process(target=_child, args=(i, os.getpid()), name=f"entitlement-{i}")
                for i in range(settings.processes)]
    failed = False
    asked: list[bool] = []  # the supervisor asked the processes to stop (a signal to it, or one ended)
    reported: set[int] = set()
    log = structlog.get_logger("entitlement.server")

    def stop_all() -> None:
        asked.append(True)
        for child in children:
            if child.is_alive() and child.pid:
                os.kill(child.pid, signal.SIGTERM)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop_all()

    # Before the processes start: a stop asked while they start stops them, and starts no more.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for child in children:
        if not asked:
            child.start()
    if asked:  # again: a signal handled inside start() missed the process it was starting
        stop_all()
    started = [c for c in children if c.pid is not None]
    while True:
        alive = any(c.is_alive() for c in started)  # before the exit codes: a last end is still seen
        for index, child in enumerate(children):
            code = child.exitcode
            # Stopped as asked: drained (exit 0), or ended while still starting (before
            # serve_forever handles signals; it had served nothing) by SIGTERM's default action,
            # or by SIGINT's (Ctrl-C in a terminal reaches the whole group, the supervisor too).
            if code is None or index in reported or (asked and code in _STOPPED_AS_ASKED):
                continue
            # A process that ended unasked (killed, failed, or stopped alone by a signal sent to it
            # and not to the supervisor: exit 0 then) left the port to the others at a fraction of
            # its capacity: said, and all are stopped, so that what runs the server restarts it.
            reported.add(index)
            log.error("worker_ended", worker=index, worker_pid=child.pid,
                      **({"signal": signal.Signals(-code).name} if code < 0 else {"exit_code": code}))
            if not failed:
                failed = True
                stop_all()
        if not alive:
            break
        time.sleep(0.2)
    return 1 if failed or any(c.exitcode not in _STOPPED_AS_ASKED for c in started) else 0


def _sweep_spools() -> None:
    """Registry extracts that a server killed during an import left spooled (personal data in
    clear) go before this one serves: entitlement/registry_feed.py. Once, before any worker."""
    log = structlog.get_logger("entitlement.server")
    try:
        removed = registry_feed.sweep_stale_spools()
    except OSError as exc:  # the server starts all the same; what the directory holds is unknown
        log.warning("extract_spools_not_swept", directory=tempfile.gettempdir(), error=type(exc).__name__)
        return
    if removed:
        log.warning("stale_extract_spools_removed", count=removed)


def main() -> int:
    settings = Settings.from_env()
    logs.configure(settings.log_level)
    _sweep_spools()
    if settings.processes > 1:
        return _supervise(settings)
    affinity.apply(settings.cpu_affinity)  # before any thread starts
    ctx = _prepare(settings)
    if isinstance(ctx, int):
        return ctx
    serve_forever(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
