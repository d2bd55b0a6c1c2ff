"""The two server models (ENTITLEMENT_SERVER_MODEL: the thread-pool server of
entitlement/server_main.py, the event-loop server of entitlement/aio_server.py) serve the same API.

The rest of the suite runs each backend with its `auto` model (SQLite: the event loop; PostgreSQL:
the thread pool). Here each backend is served by BOTH models at once, on the same database, and
every answer (successes byte for byte, errors as their google.rpc.Status) must be the same; then
what differs in their plumbing: a cancelled stream gives its thread back, and the setting itself.
The event-loop model is served twice, on each of its loops (ENTITLEMENT_EVENT_LOOP: uvloop, auto's
choice, and the standard library's asyncio).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.type import date_pb2
from grpc_status import rpc_status

from bench.common import status_key
from own_server import next_ledger_person, own_server
from support import Api, Harness, identity, log_records, next_person

from entitlement import aio_server, app
from entitlement.config import Settings
from entitlement.config import (ASYNCIO, EVENT_LOOP, THREADS, UVLOOP, EventLoopUnavailable, resolve_event_loop)
from entitlement.server_main import server_model, start
from entitlement.v1 import activation_pb2, audit_pb2, common_pb2, eligibility_pb2, registry_pb2

MODELS = (THREADS, EVENT_LOOP)
# Each server model, the event loop on each of its loops: (label, model, ENTITLEMENT_EVENT_LOOP, the
# loop it must run: None for the thread pool, which runs none).
SERVERS = ((THREADS, THREADS, "auto", None), ("event-loop/uvloop", EVENT_LOOP, UVLOOP, UVLOOP),
           ("event-loop/asyncio", EVENT_LOOP, ASYNCIO, ASYNCIO))
ELIGIBILITY = "/entitlement.v1.EligibilityService/"
ACTIVATION = "/entitlement.v1.ActivationService/"
AUDIT = "/entitlement.v1.AuditService/"


@pytest.fixture(scope="module")
def both(harness: Harness) -> Iterator[dict[str, grpc.Channel]]:
    """A server of each model (the event loop on each of its loops) on the harness's database,
    secrets and callers."""
    running, channels, contexts = [], {}, []
    try:
        for label, model, loop_setting, loop in SERVERS:
            ctx = app.build(dataclasses.replace(harness.ctx.settings, listen="127.0.0.1:0", server_model=model,
                                                event_loop=loop_setting), clock=harness.clock)
            contexts.append(ctx)
            assert server_model(ctx) == model
            running.append(start(ctx, "127.0.0.1:0"))
            assert running[-1].event_loop == loop
            if loop is not None:  # the loop object itself, not only what the server says of it
                loop_module = type(running[-1]._loop).__module__  # type: ignore[attr-defined]
                assert loop_module.split(".")[0] == ("uvloop" if loop == UVLOOP else "asyncio"), loop_module
            channels[label] = grpc.insecure_channel(f"127.0.0.1:{running[-1].port}")
        yield channels
    finally:
        for channel in channels.values():
            channel.close()
        for r in running:
            r.stop(0)
        for ctx in contexts:
            ctx.db.dispose()


Answer = tuple[str, Any]


def _status(err: grpc.RpcError) -> Answer:
    """An error as its code and google.rpc.Status (bench.common.status_key)."""
    st = rpc_status.from_call(err)
    if st is None:
        return err.code().name, (err.details(),)
    return err.code().name, status_key(st.SerializeToString())


def ask(channel: grpc.Channel, shape: str, path: str, request: bytes, metadata: tuple[tuple[str, str], ...]) -> Answer:
    """The answer to one raw call: ("OK", response bytes, or the list of a stream's), or the error."""
    ident = (lambda b: b)
    try:
        if shape == "uu":
            return "OK", channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)(
                request, metadata=metadata, timeout=15)
        if shape == "us":
            return "OK", list(channel.unary_stream(path, request_serializer=ident, response_deserializer=ident)(
                request, metadata=metadata, timeout=15))
        return "OK", channel.stream_unary(path, request_serializer=ident, response_deserializer=ident)(
            iter([request]), metadata=metadata, timeout=15)
    except grpc.RpcError as err:
        return _status(err)


def _date(d: dt.date) -> date_pb2.Date:
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


def probes(h: Harness) -> list[tuple[str, str, str, bytes, tuple[tuple[str, str], ...]]]:
    """Calls whose answers must not depend on the server model: successes, and each error path of
    the behaviours and handlers (a fixed x-request-id makes error details comparable)."""
    def md(caller: str | None) -> tuple[tuple[str, str], ...]:
        rid = (("x-request-id", "models-probe-0001"),)
        return rid + ((("authorization", f"Bearer {h.tokens[caller]}"),) if caller else ())

    agency_id, birth = next_person()
    person = common_pb2.JobSeekerIdentity(agency_id=agency_id, birth_date=_date(birth))
    check = eligibility_pb2.CheckEligibilityRequest(program="programs/premium-job-seekers",
                                                    job_seeker=person).SerializeToString()
    activate = activation_pb2.ActivateEntitlementRequest(
        request_id=f"models-{uuid.uuid4().hex[:12]}", job_seeker=person, program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="server models").SerializeToString()
    return [
        ("check", "uu", ELIGIBILITY + "CheckEligibility", check, md("advisor-paris")),
        ("check, every program", "uu", ELIGIBILITY + "CheckEligibility",
         eligibility_pb2.CheckEligibilityRequest(job_seeker=person).SerializeToString(), md("advisor-paris")),
        ("check, invalid fields", "uu", ELIGIBILITY + "CheckEligibility",
         eligibility_pb2.CheckEligibilityRequest(program="nope", job_seeker=common_pb2.JobSeekerIdentity(
             agency_id="!!")).SerializeToString(), md("advisor-paris")),
        ("check, undecodable bytes", "uu", ELIGIBILITY + "CheckEligibility", b"\xff\xff\xff", md("advisor-paris")),
        ("check, no credentials", "uu", ELIGIBILITY + "CheckEligibility", check, md(None)),
        ("check, wrong role", "uu", ELIGIBILITY + "CheckEligibility", check, md("platform-oc")),
        ("list programs", "uu", ELIGIBILITY + "ListPrograms", b"", md("advisor-paris")),
        # The same request_id twice: the first server activates, the second replays its answer.
        ("activate (then its replay)", "uu", ACTIVATION + "ActivateEntitlement", activate, md("advisor-paris")),
        ("verify, unknown account", "uu", ACTIVATION + "VerifyEntitlement",
         activation_pb2.VerifyEntitlementRequest(account_id="nobody-here").SerializeToString(), md("platform-oc")),
        ("verify, invalid account id", "uu", ACTIVATION + "VerifyEntitlement",
         activation_pb2.VerifyEntitlementRequest(account_id="\x01").SerializeToString(), md("platform-oc")),
        ("usage, empty request", "uu", ACTIVATION + "ReportUsage", b"", md("platform-oc")),
        ("signing keys", "uu", ACTIVATION + "GetSigningKeys", b"", md("platform-oc")),
        ("funder's activations", "uu", AUDIT + "ListActivations",
         audit_pb2.ListActivationsRequest(page_size=5).SerializeToString(), md("funder-ministry")),
        ("event log stream", "us", AUDIT + "StreamEvents",
         audit_pb2.StreamEventsRequest(start_sequence=1, tree_size=1).SerializeToString(), md("funder-ministry")),
        ("event log stream, bad size", "us", AUDIT + "StreamEvents",
         audit_pb2.StreamEventsRequest(tree_size=-1).SerializeToString(), md("funder-ministry")),
        ("change stream, bad cursor", "us", ACTIVATION + "WatchEntitlementChanges",
         activation_pb2.WatchEntitlementChangesRequest(cursor="not-a-cursor").SerializeToString(), md("platform-oc")),
        ("client stream, role refused", "su", "/entitlement.v1.RegistryService/ImportExtract",
         registry_pb2.ImportExtractRequest().SerializeToString(), md("advisor-paris")),
        ("health", "uu", "/grpc.health.v1.Health/Check", b"", ()),
        ("unknown method", "uu", ELIGIBILITY + "Nope", b"", md("advisor-paris")),
    ]


def test_both_models_answer_every_probe_alike(harness: Harness, both: dict[str, grpc.Channel]) -> None:
    answered_ok = set()
    for label, shape, path, request, metadata in probes(harness):
        first, *others = (ask(both[server[0]], shape, path, request, metadata) for server in SERVERS)
        for server, other in zip(SERVERS[1:], others):
            assert first == other, f"{label}: {THREADS} {first[0]} vs {server[0]} {other[0]}"
        if first[0] == "OK":
            answered_ok.add(label)
    # The probes reach the handlers, not only the error paths.
    assert {"check", "activate (then its replay)", "funder's activations", "event log stream",
            "signing keys", "health"} <= answered_ok


@pytest.mark.parametrize("model", MODELS)
def test_a_cancelled_change_stream_gives_its_thread_back(
        model: str, backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """With ONE stream thread, a second change stream is served only once the first, cancelled by
    its client, has let its thread go."""
    with own_server(backend[0], tmp_path / "own", request, stream_workers=1, server_model=model) as server:
        stub = server.channel.unary_stream(ACTIVATION + "WatchEntitlementChanges",
                                           request_serializer=lambda b: b, response_deserializer=lambda b: b)
        md = (("authorization", f"Bearer {server.tokens['platform-oc']}"),)
        for _ in range(3):
            call = stub(b"", metadata=md, timeout=10)
            first = next(iter(call))  # the bookmark: the stream holds the only stream thread
            bookmark = activation_pb2.EntitlementChange.FromString(first)
            assert bookmark.type == activation_pb2.EntitlementChange.ChangeType.CHANGE_TYPE_UNSPECIFIED
            assert bookmark.cursor
            call.cancel()


@pytest.mark.parametrize("model", MODELS)
def test_a_stream_given_up_while_it_waited_for_a_thread_never_runs(
        model: str, backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
        server_log: tuple[Path, Any]) -> None:
    """With ONE stream thread, held by a change stream, a second change stream waits for it; its
    client gives up (deadline) meanwhile. Once the first ends, the second, already over, is not run
    (the thread-pool server's rule): it writes no access line, takes no change-stream slot, holds
    no thread; a third stream is served at once. (On the event-loop server it used to run once the
    thread was free, and its change stream, told by add_callback that the call was alive, polled
    on for ever, holding the only stream thread: every later stream waited until its deadline.)"""
    with own_server(backend[0], tmp_path / "own", request, stream_workers=1, server_model=model) as server:
        stub = server.channel.unary_stream(ACTIVATION + "WatchEntitlementChanges",
                                           request_serializer=lambda b: b, response_deserializer=lambda b: b)
        token = (("authorization", f"Bearer {server.tokens['platform-oc']}"),)
        holder = stub(b"", metadata=token, timeout=30)
        next(iter(holder))  # its bookmark: it holds the only stream thread
        rid = f"given-up-{uuid.uuid4().hex[:12]}"
        waiting = stub(b"", metadata=token + (("x-request-id", rid),), timeout=0.5)
        with pytest.raises(grpc.RpcError) as gave_up:
            next(iter(waiting))
        assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        holder.cancel()
        third = stub(b"", metadata=token, timeout=5)
        bookmark = activation_pb2.EntitlementChange.FromString(next(iter(third)))
        assert bookmark.cursor
        third.cancel()
        time.sleep(0.5)  # (a line the given-up call would write, written by now)
        server_log[1].flush()
        lines = [r for r in log_records(server_log[0]) if r.get("request_id") == rid]
        assert lines == [], lines


@pytest.mark.parametrize("name,field,values,allowed", [
    ("ENTITLEMENT_SERVER_MODEL", "server_model", ("threads", "event-loop", "Event-Loop"), "auto, threads, event-loop"),
    ("ENTITLEMENT_EVENT_LOOP", "event_loop", ("uvloop", "asyncio", "AsyncIO"), "auto, uvloop, asyncio")])
def test_the_setting_is_read_and_refused_from_the_environment(
        name: str, field: str, values: tuple[str, ...], allowed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(name, raising=False)
    assert getattr(Settings.from_env(), field) == "auto"
    for value in values:
        monkeypatch.setenv(name, value)
        assert getattr(Settings.from_env(), field) == value.lower()
    monkeypatch.setenv(name, "fibers")
    with pytest.raises(SystemExit) as info:
        Settings.from_env()
    assert name in str(info.value) and allowed in str(info.value)


def test_without_uvloop_auto_is_asyncio_and_uvloop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where uvloop cannot be imported (no Windows build), `auto` gives the standard library's loop;
    `uvloop` asked for is refused, saying why; a value outside the setting's is an error."""
    import sys
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert resolve_event_loop("auto") == ASYNCIO
    loop = aio_server.new_event_loop("auto")
    try:
        assert aio_server.loop_kind(loop) == ASYNCIO and type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()
    with pytest.raises(EventLoopUnavailable, match="ENTITLEMENT_EVENT_LOOP is uvloop, but uvloop is not installed"):
        resolve_event_loop("uvloop")
    with pytest.raises(ValueError, match="'UVLOOP'"):
        resolve_event_loop("UVLOOP")
    monkeypatch.undo()
    assert resolve_event_loop("auto") == UVLOOP  # installed here: a dependency of the service


def test_auto_is_the_event_loop_on_sqlite_and_the_thread_pool_on_postgresql(harness: Harness) -> None:
    expected = EVENT_LOOP if harness.backend == "sqlite" else THREADS
    assert harness.ctx.settings.server_model == "auto"
    assert server_model(harness.ctx) == expected
    assert hasattr(harness.running, "server")
    assert isinstance(harness.running.server, grpc.aio.Server) == (expected == EVENT_LOOP)
    # auto's loop is uvloop (a dependency of the service): the suite's event-loop servers run on it.
    assert harness.running.event_loop == (UVLOOP if expected == EVENT_LOOP else None)


@pytest.mark.parametrize("model", MODELS)
def test_on_sqlite_the_event_loop_answers_checks_while_every_pool_thread_waits(
        model: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The event-loop model answers CheckEligibility on its loop: with its one pool thread held by
    an activation waiting for the database's write lock, a check is still answered; the thread-pool
    model, its one thread held the same way, answers it only once the activation is done (the
    check's deadline passes first)."""
    with own_server("sqlite", tmp_path / "own", request, max_workers=1, server_model=model,
                    db_lock_timeout_ms=30_000) as server:
        api = Api(server)
        check_id, check_birth = next_ledger_person()
        agency_id, birth = next_ledger_person()
        holder = sqlite3.connect(server.url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock: the activation waits for it
        activated: list[Any] = []
        activating = threading.Thread(target=lambda: activated.append(api.activate(agency_id, birth)))
        try:
            activating.start()
            time.sleep(1.0)  # the activation reaches the pool's only thread and waits there
            try:
                answer = api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
                    job_seeker=identity(check_id, check_birth), program="programs/premium-job-seekers"), timeout=3)
                outcome = "answered" if answer.decisions[0].eligible else "not eligible"
            except grpc.RpcError as err:
                outcome = err.code().name
            assert activating.is_alive() and not activated  # the activation was still waiting throughout
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            activating.join(timeout=30)
        assert outcome == ("answered" if model == EVENT_LOOP else "DEADLINE_EXCEEDED")
        assert len(activated) == 1 and activated[0].activation.state == activation_pb2.ACTIVE


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop's, on purpose
@pytest.mark.parametrize("loop_setting", (UVLOOP, ASYNCIO))
def test_the_process_stops_with_an_error_when_the_event_loops_thread_dies(
        harness: Harness, loop_setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event-loop model, on either loop: if the loop's thread ends while nobody stopped the
    server (an error escaped the loop; simulated here by a callback raising SystemExit on it),
    serve_forever stops what is left and exits 1, so that a supervisor starts another process at
    once, instead of keeping a process up that answers nothing, health checks included."""
    import asyncio
    import gc
    import os
    import signal
    import socket

    import structlog
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from entitlement.server_main import serve_forever

    from test_server_ops import free_port
    port = free_port()  # (kept bound until the server binds it: no other process can take it meanwhile)
    ctx = app.build(dataclasses.replace(harness.ctx.settings, listen=f"127.0.0.1:{port}", server_model=EVENT_LOOP,
                                        event_loop=loop_setting), clock=harness.clock)
    before = {t.ident for t in threading.enumerate() if t.name == "rpc-loop"}
    seen: dict[str, Any] = {}
    loops: list[asyncio.AbstractEventLoop] = []
    made = aio_server.new_event_loop

    def recorded(setting: str) -> asyncio.AbstractEventLoop:
        loops.append(made(setting))
        return loops[-1]
    monkeypatch.setattr(aio_server, "new_event_loop", recorded)

    def die() -> None:
        raise SystemExit

    def kill_the_loop() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            seen["first"] = health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=30).status
            (loop_thread,) = [t for t in threading.enumerate() if t.name == "rpc-loop" and t.ident not in before]
            (loop,) = loops
            assert aio_server.loop_kind(loop) == loop_setting
            loop.call_soon_threadsafe(die)
            loop_thread.join(30)
            seen["loop_ended"] = not loop_thread.is_alive()
        if not returned.wait(15):  # serve_forever did not notice: stop it as an operator would
            os.kill(os.getpid(), signal.SIGTERM)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    threshold = gc.get_threshold()
    returned = threading.Event()
    killer = threading.Thread(target=kill_the_loop)
    try:
        with structlog.testing.capture_logs() as logs:
            killer.start()
            with pytest.raises(SystemExit) as exited:
                try:
                    serve_forever(ctx)
                finally:
                    returned.set()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        gc.unfreeze()  # serve_forever's tune_gc, undone for the rest of the suite
        gc.set_threshold(*threshold)
        killer.join(30)
        ctx.db.dispose()
    assert seen == {"first": health_pb2.HealthCheckResponse.SERVING, "loop_ended": True}
    assert exited.value.code == 1
    events = [e["event"] for e in logs]
    assert "server_failed" in events and events[-1] == "stopped", events
    failed = next(e for e in logs if e["event"] == "server_failed")
    assert failed["reason"] == "the event loop's thread has ended"
    with socket.socket() as s:  # the port was let go: nothing listens there any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
