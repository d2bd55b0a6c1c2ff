"""Test harness: the real server on a free port, over a real gRPC channel, on a real database.

Every storage-touching test runs twice, on SQLite and on PostgreSQL (`backend` fixture). In CI
(CI=true) an unreachable PostgreSQL fails the run; elsewhere those tests skip with a message.
PostgreSQL tests use a fresh database created for the session and dropped at the end.
"""

from __future__ import annotations

import datetime as dt
import faulthandler
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import grpc
import psycopg
import pytest

from support import (CALLERS, TODAY, Api, Harness, make_registry_file)

from bench.common import pg_url

from entitlement import app, doctor, logs, registry
from entitlement.callers import write_callers
from entitlement.clock import FixedClock
from entitlement.config import ROOT, Settings
from entitlement.server_main import start
from entitlement.storage.migrate import upgrade
from entitlement.storage.db import Database

PG_ADMIN_URL = os.environ.get("ENTITLEMENT_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _pg_available() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The PostgreSQL admin URL, or skip (fail in CI) when the server is not reachable."""
    problem = _pg_available()
    if problem:
        message = f"PostgreSQL not reachable at {PG_ADMIN_URL} ({problem})"
        if IN_CI:
            pytest.fail(f"{message}: CI requires it (.ci/run starts it)")
        pytest.skip(f"{message}; start it or set ENTITLEMENT_TEST_PG_URL to run these tests")
    yield PG_ADMIN_URL


def create_pg_database(admin_url: str) -> tuple[str, str]:
    name = f"entitlement_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, pg_url(admin_url, name)


def drop_pg_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(backend name, database URL) of an empty, unmigrated database."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "entitlement.db"
        yield "sqlite", f"sqlite:///{path}"
        return
    admin = request.getfixturevalue("pg_server")
    name, url = create_pg_database(admin)
    try:
        yield "postgres", url
    finally:
        drop_pg_database(admin, name)


@pytest.fixture
def fresh_url(backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a new, empty, unmigrated database of the current backend, dropped afterwards."""
    name, _ = backend
    if name == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    admin = request.getfixturevalue("pg_server")
    db_name, url = create_pg_database(admin)
    try:
        yield url
    finally:
        drop_pg_database(admin, db_name)


@pytest.fixture
def db(fresh_url: str) -> Iterator[Database]:
    """A migrated database of its own (no server)."""
    upgrade(fresh_url)
    database = Database(fresh_url, pool_size=4)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture(scope="session")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, TextIO]]:
    """One log file for the servers of both backends' harnesses, open until the whole session ends.
    structlog's configuration is global: with a file per harness, whichever harness pytest tears
    down first would close the file the other server still writes to (the order of parametrized
    session fixtures depends on which tests run)."""
    path = tmp_path_factory.mktemp("server-log") / "server.log"
    with path.open("w") as stream:
        logs.configure("info", stream=stream)
        yield path, stream


@pytest.fixture(scope="session")
def harness(backend: tuple[str, str], tmp_path_factory: pytest.TempPathFactory,
            server_log: tuple[Path, TextIO]) -> Iterator[Harness]:
    """A migrated database with the test registry, and the real server serving it on a free port."""
    name, url = backend
    tmp = tmp_path_factory.mktemp(f"server-{name}")
    settings = Settings(
        listen="127.0.0.1:0", database_url=url, programs_dir=ROOT / "programs",
        callers_file=tmp / "callers.json", key_dir=tmp / "keys", pseudonym_key_file=tmp / "pseudonym.key",
        issuer="urn:entitlement:test", token_ttl_days=30, max_workers=8, grace_seconds=2)
    upgrade(url)
    tokens = write_callers(settings.callers_file, CALLERS)
    clock = FixedClock(dt.datetime.combine(TODAY, dt.time(10, 0), tzinfo=dt.timezone.utc))
    log_path, log_stream = server_log
    logs.configure("info", stream=log_stream)
    ctx = app.build(settings, clock=clock, create_secrets=True)
    extract = make_registry_file(tmp / "registry.csv")
    registry.import_extract(ctx.db, ctx.pseudo, clock, extract, extracted_on=TODAY - dt.timedelta(days=1))
    running = start(ctx, settings.listen)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    h = Harness(backend=name, url=url, ctx=ctx, running=running, channel=channel, tokens=tokens,
                clock=clock, log_path=log_path)
    try:
        yield h
        # After every test of the session on this backend: the database still keeps every invariant.
        problems = doctor.check(ctx.db)
        assert not problems, f"invariants broken after the suite on {name}: {problems[:10]}"
    finally:
        channel.close()
        running.stop(0)
        ctx.db.dispose()


@pytest.fixture
def api(harness: Harness) -> Api:
    return Api(harness)


# A test (its set-up and tear-down included) still running after HANG_S is taken for a hang (a
# deadlock: the 25th session's health one held a CI run until it was killed): every thread's stack
# is written to HANG_FILE and the run ends at once, exit status 1, instead of waiting for CI's
# limit with nothing to show. .ci/run prints the file. The slowest test takes under a minute.
# Under pytest-xdist (make test) each worker process has its own file, HANG_FILE + "." + its id
# ("gw0", ...): the worker ends, xdist reports its test as crashed and the run fails.
HANG_S = float(os.environ.get("ENTITLEMENT_TEST_HANG_S", "600"))
HANG_FILE = Path(os.environ.get("ENTITLEMENT_TEST_HANG_FILE",
                                Path(tempfile.gettempdir()) / f"entitlement-tests-hang-{os.getpid()}.txt"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    HANG_FILE = HANG_FILE.with_name(f"{HANG_FILE.name}.{os.environ['PYTEST_XDIST_WORKER']}")
_hang_file: TextIO | None = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    global _hang_file
    if HANG_S > 0:
        if _hang_file is None:
            _hang_file = HANG_FILE.open("w")  # (a file: pytest captures the standard streams' descriptors)
        faulthandler.dump_traceback_later(HANG_S, exit=True, file=_hang_file)
    try:
        yield
    finally:
        if HANG_S > 0:
            faulthandler.cancel_dump_traceback_later()


def pytest_unconfigure(config: pytest.Config) -> None:
    """No hang: the file stays empty and goes (one left in the temporary directory per run, before)."""
    global _hang_file
    if _hang_file is not None:
        _hang_file.close()
        _hang_file = None
        if HANG_FILE.exists() and HANG_FILE.stat().st_size == 0:
            HANG_FILE.unlink()


HEALTH_EVENTS = ("database_unreachable", "database_reachable", "database_ping_missed", "database_ping_late")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that used the shared servers' log gets, in its report, the database health
    monitors' last events from it (a CI run shows a failure's report, never the log file: in CI a
    monitor once reported an outage that no local run reproduced)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    server_log = getattr(item, "funcargs", {}).get("server_log")
    if report.when != "call" or not report.failed or server_log is None:
        return
    path, stream = server_log
    stream.flush()
    events = [line.rstrip() for line in path.read_text(errors="replace").splitlines()
              if any(f'"event": "{e}"' in line for e in HEALTH_EVENTS)]
    report.sections.append(("database health events in the servers' log (the last 20)",
                            "\n".join(events[-20:]) or "none"))
