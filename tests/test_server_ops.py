"""Operating the server: `server.py` as a real process, configured only by ENTITLEMENT_* variables.

Refusing to start (unmigrated database, bad program file), health and reflection without
credentials, graceful stop on SIGTERM, one JSON access-log line per call without personal data,
and INTERNAL errors that leak nothing but a request id.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import queue
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from alembic import command
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import create_pg_database, drop_pg_database
from support import (CALLERS, SPECIAL, Api, As, Harness, date_msg, failure, identity, log_records,
                     make_registry_file, next_person, pool_birth)

from entitlement import registry
from entitlement.callers import write_callers
from entitlement.clock import SystemClock
from entitlement.config import ROOT, Settings
from entitlement.logtree import create_key_file
from entitlement.pseudonym import Pseudonymizer
from entitlement.server_main import SERVICE_NAMES
from entitlement.storage.db import Database
from entitlement.storage.migrate import alembic_config, head_revision, upgrade
from entitlement.tokens import generate_key
from entitlement.v1 import (activation_pb2, activation_pb2_grpc, audit_pb2, audit_pb2_grpc, eligibility_pb2,
                            eligibility_pb2_grpc)

PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
CLI = [PYTHON, "-c", "import sys; from entitlement.cli import main; sys.exit(main())"]
START_TIMEOUT = 30.0


# Ports handed out by free_port, each held by a socket bound to it (SO_REUSEADDR, never listening)
# until this process ends. A port merely found free and let go could be taken, before the server
# binds it, by another process (under pytest-xdist, the other worker's servers and probes bind
# port 0 all the time): the server then fails to start, or the health check reaches the other
# process's server. Bound this way the port is never handed out by bind(0) nor taken by connect(),
# a connection to it is refused until the server listens, and the server (gRPC binds with
# SO_REUSEADDR) binds it all the same, again after a restart.
_RESERVED: list[socket.socket] = []


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    _RESERVED.append(s)
    return int(s.getsockname()[1])


@dataclass
class ServerDir:
    """A temp folder with everything the server needs, and the environment that points at it."""

    root: Path
    database_url: str
    tokens: dict[str, str]
    port: int = field(default_factory=free_port)
    programs_dir: Path = ROOT / "programs"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "server.stderr"

    @property
    def pseudonym_key_file(self) -> Path:
        return self.root / "secrets" / "pseudonym.key"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENTITLEMENT_")}
        env.update({
            "ENTITLEMENT_LISTEN": self.address,
            "ENTITLEMENT_DATABASE_URL": self.database_url,
            "ENTITLEMENT_PROGRAMS_DIR": str(self.programs_dir),
            "ENTITLEMENT_CALLERS_FILE": str(self.root / "callers.json"),
            "ENTITLEMENT_KEY_DIR": str(self.root / "keys"),
            "ENTITLEMENT_PSEUDONYM_KEY_FILE": str(self.pseudonym_key_file),
            "ENTITLEMENT_GRACE_SECONDS": "5",
            "ENTITLEMENT_MAX_WORKERS": "8",
            # These servers take bursts of checks and activations (drain, concurrency); the rate
            # limit has tests of its own (test_security.py).
            "ENTITLEMENT_CHECK_RATE_PER_MIN": "0",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def run(self, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run the server to completion (for servers that must refuse to start)."""
        return subprocess.run([PYTHON, "server.py"], cwd=ROOT, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def log_lines(self) -> list[dict[str, Any]]:
        return log_records(self.log_path)


def prepare(root: Path, database_url: str | None = None, *, migrate: bool = True,
            with_registry: bool = True) -> ServerDir:
    root.mkdir(parents=True, exist_ok=True)
    tokens = write_callers(root / "callers.json", CALLERS)
    generate_key(root / "keys")
    url = database_url or f"sqlite:///{root / 'entitlement.db'}"
    d = ServerDir(root=root, database_url=url, tokens=tokens)
    pseudo = Pseudonymizer.from_file(d.pseudonym_key_file, create=True)
    create_key_file(d.pseudonym_key_file.parent / "log.key")  # the event log's checkpoint key (its default place)
    if migrate:
        upgrade(url)
        if with_registry:
            db = Database(url, pool_size=1)
            try:
                registry.import_extract(db, pseudo, SystemClock(), make_registry_file(root / "registry.csv"),
                                        extracted_on=SystemClock().today())
            finally:
                db.dispose()
    return d


class Server:
    """`server.py` running as a child process; stopped (SIGTERM, then SIGKILL) by the fixture."""

    def __init__(self, d: ServerDir) -> None:
        self.dir = d
        self._stderr = d.log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen([PYTHON, "server.py"], cwd=ROOT, env=d.env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr)
        self.channel = grpc.insecure_channel(d.address)
        try:
            self._wait_serving()
        except BaseException:
            self.close()
            raise

    def _wait_serving(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not serving after {START_TIMEOUT}s:\n{self.stderr()}")

    def stderr(self) -> str:
        self._stderr.flush()
        return self.dir.log_path.read_text(encoding="utf-8")

    def metadata(self, caller: str | None, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
        md: list[tuple[str, str]] = []
        if caller:
            md.append(("authorization", f"Bearer {self.dir.tokens[caller]}"))
        if request_id:
            md.append(("x-request-id", request_id))
        return tuple(md)

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._stderr.close()


@pytest.fixture
def server_dir(tmp_path: Path) -> ServerDir:
    return prepare(tmp_path / "srv")


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One well-behaved server for the read-only checks of this module."""
    server = Server(prepare(tmp_path_factory.mktemp("ops") / "srv"))
    try:
        yield server
    finally:
        server.close()


def _stubs(channel: grpc.Channel) -> tuple[Any, Any, Any]:
    return (eligibility_pb2_grpc.EligibilityServiceStub(channel), activation_pb2_grpc.ActivationServiceStub(channel),
            audit_pb2_grpc.AuditServiceStub(channel))


# ------------------------------------------------------------------------------------------ refusing to start

@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    admin = request.getfixturevalue("pg_server")
    name, url = create_pg_database(admin)
    try:
        yield url
    finally:
        drop_pg_database(admin, name)


def test_refuses_to_start_on_an_unmigrated_database(tmp_path: Path, empty_database_url: str) -> None:
    d = prepare(tmp_path / "srv", empty_database_url, migrate=False)
    result = d.run()
    assert result.returncode == 2, result.stderr
    assert "no schema" in result.stderr
    assert "`entitlement db upgrade`" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_to_start_on_a_database_at_an_older_revision(tmp_path: Path) -> None:
    d = prepare(tmp_path / "srv", with_registry=False)
    command.downgrade(alembic_config(f"sqlite:///{tmp_path / 'srv' / 'entitlement.db'}"), "0001")
    result = d.run()
    assert result.returncode == 2, result.stderr
    assert f"at revision 0001 but this version needs {head_revision()}" in result.stderr
    assert "`entitlement db upgrade`" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_to_start_on_a_database_from_a_newer_version(tmp_path: Path) -> None:
    d = prepare(tmp_path / "srv", with_registry=False)
    with sqlite3.connect(tmp_path / "srv" / "entitlement.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099future'")
    result = d.run()
    assert result.returncode == 2, result.stderr
    assert "at revision 0099future, which this version does not know" in result.stderr
    assert "db upgrade" not in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_to_start_with_an_unknown_time_zone(tmp_path: Path) -> None:
    d = prepare(tmp_path / "srv", with_registry=False)
    d.extra_env["ENTITLEMENT_TIMEZONE"] = "Mars/Olympus"
    result = d.run()
    assert result.returncode != 0
    assert "ENTITLEMENT_TIMEZONE must be a time zone of the IANA database" in result.stderr
    assert "'Mars/Olympus'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("ttl", ["0", "-1"])
def test_refuses_to_start_with_a_token_lifetime_below_one_day(tmp_path: Path, ttl: str) -> None:
    """Tokens would be born expired (exp <= iat): every redemption TOKEN_EXPIRED after the money
    was committed."""
    d = prepare(tmp_path / "srv", migrate=False)
    d.extra_env["ENTITLEMENT_TOKEN_TTL_DAYS"] = ttl
    result = d.run()
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"ENTITLEMENT_TOKEN_TTL_DAYS must be at least 1, got {ttl}"]


@pytest.mark.parametrize("kind", ["postgres-down", "sqlite-not-a-database"])
def test_a_database_that_cannot_be_reached_or_opened_stops_the_start_in_one_line(tmp_path: Path, kind: str) -> None:
    """Before: ~120 lines of psycopg / sqlite3 traceback. Now the line the CLI prints, password hidden."""
    if kind == "postgres-down":  # nothing listens on port 1
        url, says, shown = ("postgresql://postgres:pw-s3cret@127.0.0.1:1/entitlement", "port 1 failed",
                            "postgresql://postgres:***@127.0.0.1:1/entitlement")
    else:
        (tmp_path / "junk.db").write_bytes(b"this is not a database file, just text " * 100)
        url = shown = f"sqlite:///{tmp_path / 'junk.db'}"
        says = "file is not a database"
    d = prepare(tmp_path / "srv", url, migrate=False)
    result = d.run()
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("entitlement: cannot start: database unavailable ("), line
    assert says in line and f"check ENTITLEMENT_DATABASE_URL ({shown})" in line, line
    assert "s3cret" not in line


# Numbers out of their settings' bounds (entitlement/config.py, README "Configuration"): 0 where
# nothing is documented for it, a negative number everywhere (CHECK_RATE_PER_MIN=-1 turned the limit
# off), timeouts PostgreSQL would refuse on every connection. Before, MAX_WORKERS=0 was a traceback
# from the thread pool and the others were taken.
OUT_OF_BOUNDS = [
    ("ENTITLEMENT_MAX_WORKERS", "0", "at least 1"), ("ENTITLEMENT_STREAM_WORKERS", "0", "at least 1"),
    ("ENTITLEMENT_PROCESSES", "0", "at least 1"), ("ENTITLEMENT_PROCESSES", "-2", "at least 1"),
    ("ENTITLEMENT_PROCESSES", "257", "at most 256"),
    ("ENTITLEMENT_GRACE_SECONDS", "-1", "at least 0"),
    ("ENTITLEMENT_LIVE_STATUS_TIMEOUT_MS", "0", "at least 1"), ("ENTITLEMENT_LIVE_STATUS_RETRIES", "-1", "at least 0"),
    ("ENTITLEMENT_LIVE_STATUS_BREAKER_FAILURES", "0", "at least 1"),
    ("ENTITLEMENT_LIVE_STATUS_BREAKER_RESET_S", "0", "at least 1"),
    ("ENTITLEMENT_WATCH_POLL_MS", "0", "at least 1"), ("ENTITLEMENT_WATCH_MAX_STREAMS", "0", "at least 1"),
    ("ENTITLEMENT_WATCH_MAX_PER_CALLER", "0", "at least 1"), ("ENTITLEMENT_PUBLIC_STREAMS", "0", "at least 1"),
    ("ENTITLEMENT_CALLER_CACHE_SECONDS", "-1", "at least 0"),
    ("ENTITLEMENT_CALLER_ROTATION_OVERLAP_MINUTES", "-1", "at least 0"),
    ("ENTITLEMENT_CHECK_RATE_PER_MIN", "-1", "at least 0"), ("ENTITLEMENT_CHECK_BURST", "0", "at least 1"),
    ("ENTITLEMENT_RETENTION_DAYS", "0", "at least 1"),
    ("ENTITLEMENT_DB_LOCK_TIMEOUT_MS", "-1", "at least 0"),
    ("ENTITLEMENT_DB_LOCK_TIMEOUT_MS", "2147483648", "at most 2147483647"),
    ("ENTITLEMENT_DB_STATEMENT_TIMEOUT_MS", "-1", "at least 0"),
    ("ENTITLEMENT_DB_STATEMENT_TIMEOUT_MS", "2147483648", "at most 2147483647"),
    ("ENTITLEMENT_DB_CONNECT_TIMEOUT_S", "0", "at least 2"), ("ENTITLEMENT_DB_CONNECT_TIMEOUT_S", "1", "at least 2"),
    ("ENTITLEMENT_DB_PING_MS", "-1", "at least 0"), ("ENTITLEMENT_DB_PING_TIMEOUT_MS", "0", "at least 1"),
    ("ENTITLEMENT_DB_ANALYZE_EVERY_S", "-1", "at least 0"),
    ("ENTITLEMENT_DB_ANALYZE_EVERY_S", "86401", "at most 86400"),
    # Above these, an OverflowError traceback at start (gRPC's C ints; waits beyond time_t).
    ("ENTITLEMENT_MAX_WORKERS", "1000000000", "at most 10000"),
    ("ENTITLEMENT_STREAM_WORKERS", "10001", "at most 10000"),
    ("ENTITLEMENT_MAX_CONCURRENT_RPCS", "1000000000000", "at most 2147483647"),
    ("ENTITLEMENT_KEEPALIVE_SECONDS", "99999999999", "at most 2147483"),
    ("ENTITLEMENT_KEEPALIVE_TIMEOUT_SECONDS", "2147484", "at most 2147483"),
    ("ENTITLEMENT_DB_PING_MS", "99999999999999", "at most 86400000"),
    ("ENTITLEMENT_DB_PING_TIMEOUT_MS", "86400001", "at most 86400000"),
    ("ENTITLEMENT_WATCH_POLL_MS", "86400001", "at most 86400000"),
    ("ENTITLEMENT_LIVE_STATUS_TIMEOUT_MS", "86400001", "at most 86400000"),
]


@pytest.mark.parametrize(("name", "value", "bound"), OUT_OF_BOUNDS, ids=[f"{n}={v}" for n, v, _ in OUT_OF_BOUNDS])
def test_refuses_to_start_with_a_number_setting_out_of_its_bounds(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                   value: str, bound: str) -> None:
    """The settings the server starts from (Settings.from_env, server.py's first step: the refusal is
    its one line on stderr and exit 1, as the real server shows for the token lifetime above)."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as refused:
        Settings.from_env()
    assert refused.value.code == f"{name} must be {bound}, got {value}"
    monkeypatch.delenv(name)
    Settings.from_env()  # the rest of this environment is fine
PROGRAM = "premium-job-seekers.yaml"
BREAKS = {
    "unknown key": (lambda t: t + "colour: blue\n", "colour", "unknown key"),
    "shares": (lambda t: _replace(t, "{ministry-of-labour: 5000, france-travail: 5000}",
                                  "{ministry-of-labour: 5000, france-travail: 4000}"),
               "parameters.funders.values.2015-09-01.value", "shares must sum to 10000"),
    "negative price": (lambda t: _replace(t, "value: 2000\n", "value: -2000\n"),
                       "parameters.price_per_month_cents.values.2015-09-01.value", "from 0 to 10000000"),
    "bad period date": (lambda t: _replace(t, "start: 2015-09-01", "start: 2015-13-01"),
                        "period.start", "expected a date YYYY-MM-DD"),
    "bad value date": (lambda t: _replace(t, "      2015-09-01:\n        value: 12\n", "      2015-02-30:\n        value: 12\n"),
                       "parameters.activation_months.values", "expected a date YYYY-MM-DD"),
}


def _replace(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"program file changed: {old!r} not found exactly once"
    return text.replace(old, new)


@pytest.mark.parametrize("brk", list(BREAKS))
def test_a_bad_program_file_stops_the_server_and_the_checker_says_the_same(tmp_path: Path, brk: str) -> None:
    transform, field_name, fragment = BREAKS[brk]
    programs = tmp_path / "programs"
    shutil.copytree(ROOT / "programs", programs)
    broken = programs / PROGRAM
    broken.write_text(transform(broken.read_text(encoding="utf-8")), encoding="utf-8")
    d = prepare(tmp_path / "srv", with_registry=False)
    d.programs_dir = programs

    served = d.run()
    assert served.returncode == 2, served.stderr
    assert "Traceback" not in served.stderr
    m = re.search(r"^entitlement: cannot start: (.*)$", served.stderr, re.MULTILINE)
    assert m, served.stderr
    message = m.group(1)
    assert message.startswith(f"{broken}: {field_name}: "), message
    assert fragment in message

    checked = subprocess.run([*CLI, "programs", "check", str(programs)], cwd=ROOT, env=d.env(),
                             capture_output=True, text=True, timeout=START_TIMEOUT)
    assert checked.returncode == 1, checked.stderr
    assert checked.stderr.strip() == f"entitlement: {message}"


def test_the_checker_accepts_the_shipped_programs(tmp_path: Path) -> None:
    checked = subprocess.run([*CLI, "programs", "check", str(ROOT / "programs")], cwd=ROOT, capture_output=True,
                             text=True, timeout=START_TIMEOUT)
    assert checked.returncode == 0, checked.stderr
    assert {line.split()[1] for line in checked.stdout.splitlines() if line.startswith("ok ")} == {
        p.stem for p in (ROOT / "programs").glob("*.yaml")}


# ------------------------------------------------------------------------------------------ health, reflection

def test_health_answers_serving_without_credentials(shared_server: Server) -> None:
    stub = health_pb2_grpc.HealthStub(shared_server.channel)
    for service in ("", *SERVICE_NAMES):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="entitlement.v1.NoSuchService"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # ...while the services themselves do want credentials.
    eligibility, _, _ = _stubs(shared_server.channel)
    with pytest.raises(grpc.RpcError) as info:
        eligibility.ListPrograms(eligibility_pb2.ListProgramsRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("command", [
    ["--help"], ["programs", "check"], ["programs", "list", "--token", "{admin}"],
    ["check", "CAT0006", SPECIAL["CAT0006"][0], "--token", "{advisor-paris}"],
    ["events", "--token", "{admin}"], ["events", "--json", "--token", "{admin}"]])
@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_output_into_a_pipe_closed_early_ends_quietly(shared_server: Server, command: list[str],
                                                        unbuffered: str) -> None:
    """`entitlement events | head -1`: the reader is gone before the command wrote (the pipe's read
    end is closed at once, so every write fails: the worst case of `head`). Before: a
    BrokenPipeError traceback. Now: nothing on stderr, exit code 141 (128 + SIGPIPE)."""
    argv = [a.format(**shared_server.dir.tokens) for a in command]
    env = {**shared_server.dir.env(), "ENTITLEMENT_ADDRESS": shared_server.dir.address, "PYTHONUNBUFFERED": unbuffered}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*CLI, *argv], cwd=ROOT, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=60)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    # argparse's own help, written unbuffered, ignores the error itself (and exits 0).
    assert proc.returncode == 141 or (proc.returncode == 0 and argv == ["--help"] and unbuffered)


def test_reflection_lists_and_describes_the_services_without_credentials(shared_server: Server) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(shared_server.channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="entitlement.v1.ActivationService")]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert set(SERVICE_NAMES) <= names
    assert set(SERVICE_NAMES) == {"entitlement.v1.EligibilityService", "entitlement.v1.ActivationService",
                                  "entitlement.v1.AuditService", "entitlement.v1.RegistryService"}
    assert "grpc.health.v1.Health" in names
    assert not described.HasField("error_response"), described.error_response.error_message
    assert described.file_descriptor_response.file_descriptor_proto



@pytest.mark.parametrize("model", ["threads", "event-loop"])
def test_open_health_watches_and_reflection_streams_are_capped_and_leave_the_calls_served(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest, model: str) -> None:
    """Health and reflection need no credentials, and each has a stream a client may hold open.
    Unbounded, an anonymous client locked every caller out (found by a review): on the event loop
    96 open Health.Watch streams took every call slot of the process (RESOURCE_EXHAUSTED for all),
    and on the thread pool 4 open reflection streams held the 4 unary threads (every check waited).
    Now each kind is capped at ENTITLEMENT_PUBLIC_STREAMS (entitlement/api/public.py)."""
    from own_server import next_ledger_person, own_server
    limit = 4
    with own_server(backend[0], tmp_path / "srv", request, server_model=model, max_workers=4,
                    public_streams=limit) as h:
        reflect = reflection_pb2_grpc.ServerReflectionStub(h.channel)
        health_stub = health_pb2_grpc.HealthStub(h.channel)
        held: list[Any] = []
        ends: list[queue.Queue[Any]] = []
        try:
            for _ in range(limit):  # reflection streams left open by a client that sends nothing more
                requests: queue.Queue[Any] = queue.Queue()
                requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
                call = reflect.ServerReflectionInfo(iter(requests.get, None), timeout=30)
                assert next(call).HasField("list_services_response")
                held.append(call)
                ends.append(requests)
            with pytest.raises(grpc.RpcError) as info:
                next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  timeout=5))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
            assert "ENTITLEMENT_PUBLIC_STREAMS" in (info.value.details() or "")
            refused = 0
            for _ in range(3 * limit):  # health watches: capped where each holds a call slot
                watch = health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
                try:
                    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                    held.append(watch)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                    refused += 1
            # (the thread-pool server's Watch holds no thread and no slot: not capped)
            assert refused == (2 * limit if model == "event-loop" else 0)
            assert health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            agency_id, birth = next_ledger_person()
            [decision] = As(h.channel, h.tokens["advisor-paris"]).CheckEligibility(
                eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(agency_id, birth),
                                                        program="programs/premium-job-seekers"), timeout=5).decisions
            assert decision.eligible
        finally:
            for call in held:
                call.cancel()
            for requests in ends:
                requests.put(None)



def test_health_watchers_going_away_while_health_flips_never_stop_the_server(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The thread-pool server's health (grpc_health's) sent each status to its watchers holding its
    lock, and a closing watcher's callback, run on the server's event thread, took that lock: a
    watcher going away as the status flipped (the database monitor, the server's stop) deadlocked
    the event thread, and every call of the process with it (seen as a CI run hanging at a test's
    server stop). Watchers come and go while the status flips; the server still answers after."""
    from own_server import own_server
    with own_server(backend[0], tmp_path / "srv", request, server_model="threads") as h:
        stub = health_pb2_grpc.HealthStub(h.channel)
        stop = threading.Event()

        def flip() -> None:
            serving = False
            while not stop.is_set():
                h.running.set_serving(serving)
                serving = not serving
        flipper = threading.Thread(target=flip, daemon=True)
        flipper.start()
        try:
            for _ in range(60):
                watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10) for _ in range(6)]
                for w in watches:
                    next(w)
                for w in watches:
                    w.cancel()
        finally:
            stop.set()
            flipper.join(20)
        assert not flipper.is_alive(), "setting the health status hangs: the server's event thread is stuck"
        h.running.set_serving(True)
        assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------------------------ access log

def _rpc_lines(server: Server, request_ids: set[str]) -> list[dict[str, Any]]:
    """The access-log lines of these requests (the line is written before the answer is sent;
    a short wait only covers the file system)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [x for x in server.dir.log_lines() if x.get("event") == "rpc" and x.get("request_id") in request_ids]
        if {x["request_id"] for x in lines} >= request_ids or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_every_call_logs_one_json_line(shared_server: Server) -> None:
    s = shared_server
    eligibility, activation, audit = _stubs(s.channel)
    agency_id, birth = "P0002999", pool_birth(2999)
    calls: list[tuple[str, str | None, str, Any, Any]] = [
        # (expected code, caller, method, stub method, request)
        ("OK", "advisor-paris", "/entitlement.v1.EligibilityService/CheckEligibility", eligibility.CheckEligibility,
         eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(agency_id, birth))),
        ("OK", "funder-ft", "/entitlement.v1.EligibilityService/ListPrograms", eligibility.ListPrograms,
         eligibility_pb2.ListProgramsRequest()),
        ("OK", "platform-oc", "/entitlement.v1.ActivationService/GetSigningKeys", activation.GetSigningKeys,
         activation_pb2.GetSigningKeysRequest()),
        ("OK", "funder-ministry", "/entitlement.v1.AuditService/GetFundingReport", audit.GetFundingReport,
         audit_pb2.GetFundingReportRequest()),
        ("NOT_FOUND", "admin", "/entitlement.v1.ActivationService/GetActivation", activation.GetActivation,
         activation_pb2.GetActivationRequest(name="activations/" + "0" * 32)),
        ("INVALID_ARGUMENT", "advisor-lyon", "/entitlement.v1.EligibilityService/CheckEligibility",
         eligibility.CheckEligibility, eligibility_pb2.CheckEligibilityRequest()),
    ]
    sent: dict[str, tuple[str, str | None, str]] = {}
    for code, caller, method, fn, request in calls:
        rid = "log-" + uuid.uuid4().hex
        sent[rid] = (code, caller, method)
        try:
            fn(request, metadata=s.metadata(caller, rid), timeout=10)
            got = "OK"
        except grpc.RpcError as err:
            got = err.code().name
            assert failure(err).metadata.get("request_id") == rid  # the error quotes the caller's id
        assert got == code, method

    lines = _rpc_lines(s, set(sent))
    assert sorted(x["request_id"] for x in lines) == sorted(sent)  # exactly one line per call
    for line in lines:
        code, caller, method = sent[line["request_id"]]
        assert {"request_id", "method", "caller", "code", "latency_ms"} <= set(line), line
        assert (line["code"], line["caller"], line["method"]) == (code, caller, method)
        assert isinstance(line["latency_ms"], (int, float)) and line["latency_ms"] >= 0
        assert line["level"] == "info"


@pytest.mark.parametrize(("caller", "argv", "code", "reason"), [
    ("admin", ["get", "activations/" + "0" * 32], "NOT_FOUND", "[ACTIVATION_NOT_FOUND]"),
    ("funder-ft", ["check", "P0002997", "1990-01-01"], "PERMISSION_DENIED", None),
    (None, ["programs", "list"], "UNAUTHENTICATED", None),
])
def test_cli_errors_quote_the_request_id_the_server_logged(shared_server: Server, caller: str | None,
                                                           argv: list[str], code: str, reason: str | None) -> None:
    """README: errors carry the request_id to quote to operators. The CLI's one line printed the
    code, message and reason, but not it."""
    s = shared_server
    env = {**s.dir.env(), "ENTITLEMENT_ADDRESS": s.dir.address}
    env.pop("ENTITLEMENT_TOKEN", None)
    token = [f"--token={s.dir.tokens[caller]}"] if caller else []
    r = subprocess.run([*CLI, *argv, *token], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == "", r
    [line] = r.stderr.splitlines()
    assert line.startswith(f"entitlement: {code}: "), line
    assert reason is None or reason in line, line
    m = re.search(r" \(request id ([A-Za-z0-9_-]{1,64})\)$", line)
    assert m, line
    [logged] = _rpc_lines(s, {m.group(1)})
    assert logged["code"] == code


def test_refused_calls_are_logged_too(shared_server: Server) -> None:
    s = shared_server
    eligibility, _, _ = _stubs(s.channel)
    request = eligibility_pb2.ListProgramsRequest()
    unauthenticated, bad_token, wrong_role = ("log-" + uuid.uuid4().hex for _ in range(3))
    codes = {}
    for rid, md in ((unauthenticated, (("x-request-id", unauthenticated),)),
                    (bad_token, (("authorization", "Bearer not-a-token"), ("x-request-id", bad_token)))):
        with pytest.raises(grpc.RpcError) as info:
            eligibility.ListPrograms(request, metadata=md, timeout=10)
        codes[rid] = info.value.code().name
    with pytest.raises(grpc.RpcError) as info:
        eligibility.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
            job_seeker=identity("P0002998", pool_birth(2998))), metadata=s.metadata("funder-ft", wrong_role), timeout=10)
    codes[wrong_role] = info.value.code().name
    assert codes == {unauthenticated: "UNAUTHENTICATED", bad_token: "UNAUTHENTICATED",
                     wrong_role: "PERMISSION_DENIED"}

    lines = _rpc_lines(s, set(codes))
    assert sorted(x["request_id"] for x in lines) == sorted(codes)
    for line in lines:
        assert {"request_id", "method", "code", "latency_ms"} <= set(line), line
        assert line["code"] == codes[line["request_id"]]
    # A known caller refused for its role is named; nobody is named for a missing or bad token.
    callers = {x["request_id"]: (x.get("caller"), x.get("role")) for x in lines}
    assert callers == {unauthenticated: (None, None), bad_token: (None, None), wrong_role: ("funder-ft", "funder")}
    [refusal] = [x for x in s.dir.log_lines() if x.get("event") == "access_refused" and x["request_id"] == wrong_role]
    assert (refusal["reason"], refusal["caller"]) == ("ROLE_NOT_ALLOWED", "funder-ft")
    assert "not-a-token" not in s.stderr()


def test_a_malformed_request_id_is_replaced(shared_server: Server) -> None:
    s = shared_server
    eligibility, _, _ = _stubs(s.channel)
    bad = "bad id " + uuid.uuid4().hex  # spaces are not allowed: the server makes its own id
    with pytest.raises(grpc.RpcError) as info:
        eligibility.ListPrograms(eligibility_pb2.ListProgramsRequest(), metadata=(("x-request-id", bad),), timeout=10)
    rid = failure(info.value).metadata["request_id"]
    assert re.fullmatch(r"[0-9a-f]{16}", rid)
    assert [x["code"] for x in _rpc_lines(s, {rid})] == ["UNAUTHENTICATED"]
    assert bad not in s.stderr()


def test_agency_ids_and_birth_dates_never_reach_the_log(api: Api, harness: Harness) -> None:
    """In-process server: the log file of the harness after calls that carry identities."""
    people = [next_person() for _ in range(3)]
    ended = ("ENDED01", dt.date.fromisoformat(SPECIAL["ENDED01"][0]))
    rids = []

    def md(caller: str) -> tuple[tuple[str, str], ...]:
        rid = "pii-" + uuid.uuid4().hex
        rids.append(rid)
        return (*api.as_(caller).metadata, ("x-request-id", rid))

    check = eligibility_pb2_grpc.EligibilityServiceStub(harness.channel).CheckEligibility
    act = activation_pb2_grpc.ActivationServiceStub(harness.channel).ActivateEntitlement
    (a, a_birth), (b, b_birth), (c, c_birth) = people
    check(eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(a, a_birth)), metadata=md("advisor-paris"))
    check(eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(b, b_birth + dt.timedelta(days=3))),
          metadata=md("advisor-paris"))
    check(eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(*ended)), metadata=md("advisor-lyon"))
    act(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(c, c_birth), program="programs/premium-job-seekers", platform="platforms/openclassrooms",
        reason="log test"), metadata=md("advisor-paris"))
    refused = [  # refused calls: not eligible, unknown person, a malformed id, a caller without the role
        (act, activation_pb2.ActivateEntitlementRequest(job_seeker=identity(*ended), program="programs/premium-job-seekers",
                                                        platform="platforms/openclassrooms"), "advisor-paris"),
        (act, activation_pb2.ActivateEntitlementRequest(job_seeker=identity(b, b_birth - dt.timedelta(days=1)),
                                                        program="programs/premium-job-seekers",
                                                        platform="platforms/openclassrooms"), "advisor-paris"),
        (check, eligibility_pb2.CheckEligibilityRequest(job_seeker=identity("BAD-ID-" + a, a_birth)), "advisor-paris"),
        (check, eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(a, a_birth)), "platform-oc"),
    ]
    for fn, request, caller in refused:
        with pytest.raises(grpc.RpcError):
            fn(request, metadata=md(caller))

    text = harness.log_path.read_text(encoding="utf-8")
    logged = log_records(harness.log_path)
    assert {x["request_id"] for x in logged if x.get("event") == "rpc"} >= set(rids), "the calls were not logged"
    secrets = {a, b, c, ended[0]}
    for d in (a_birth, b_birth, c_birth, b_birth + dt.timedelta(days=3), b_birth - dt.timedelta(days=1), ended[1]):
        secrets |= {d.isoformat(), d.strftime("%Y%m%d"), d.strftime("%d/%m/%Y")}
    leaked = sorted(x for x in secrets if x in text)
    assert leaked == []


# ------------------------------------------------------------------------------------------ graceful stop

def test_sigterm_drains_and_exits_zero(server_dir: ServerDir) -> None:
    server = Server(server_dir)
    try:
        watch_statuses: list[int] = []
        watch = health_pb2_grpc.HealthStub(server.channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                                  timeout=60)

        def follow_health() -> None:
            try:
                for resp in watch:
                    watch_statuses.append(resp.status)
                    if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        watch.cancel()  # a load balancer stops sending here: the stream ends
                        return
            except grpc.RpcError:
                pass

        watcher = threading.Thread(target=follow_health)
        watcher.start()

        stop = threading.Event()
        answers: dict[str, grpc.StatusCode] = {}  # request id -> status the client got
        answered = threading.Semaphore(0)
        lock = threading.Lock()

        def caller(i: int) -> None:
            channel = grpc.insecure_channel(server_dir.address)
            check = eligibility_pb2_grpc.EligibilityServiceStub(channel).CheckEligibility
            agency_id = f"P{2990 + i:07d}"
            request = eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(agency_id, pool_birth(2990 + i)))
            try:
                while not stop.is_set():
                    rid = f"drain-{i}-{uuid.uuid4().hex}"
                    try:
                        check(request, metadata=server.metadata("advisor-paris", rid), timeout=10)
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as err:
                        code = err.code()
                    with lock:
                        answers[rid] = code
                    answered.release()
                    if code != grpc.StatusCode.OK:
                        if server.proc.poll() is not None:
                            return
                        stop.wait(0.02)  # refused while the server drains: back off a little
            finally:
                channel.close()

        callers = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
        for t in callers:
            t.start()
        for _ in range(20):  # calls are flowing
            assert answered.acquire(timeout=20)

        server.proc.send_signal(signal.SIGTERM)
        rc = server.proc.wait(timeout=5 + 10)  # grace period (ENTITLEMENT_GRACE_SECONDS=5) and start-up slack
        stop.set()
        for t in callers:
            t.join(timeout=30)
        watcher.join(timeout=30)

        assert rc == 0, server.stderr()
        assert watch_statuses[0] == health_pb2.HealthCheckResponse.SERVING
        assert watch_statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
        lines = server_dir.log_lines()
        logged = {x["request_id"]: x["code"] for x in lines if x.get("event") == "rpc" and "request_id" in x}
        seen = set(answers.values())
        assert grpc.StatusCode.OK in seen
        assert seen <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, seen
        for rid, code in answers.items():
            if code == grpc.StatusCode.OK:
                assert logged.get(rid) == "OK"
            else:
                # Refused during shutdown before any handler ran: nothing was done, safe to retry.
                # (grpc core answers CANCELLED instead of UNAVAILABLE for calls it had queued but
                # not yet handed to the application: grpc/grpc#41785.)
                assert rid not in logged, (rid, code, logged.get(rid))
        assert "INTERNAL" not in logged.values()
        events = [x.get("event") for x in lines]
        assert events.count("stopping") == 1 and events.count("stopped") == 1
        assert events.index("stopping") < events.index("stopped")
        # Every call that was handled finished before the server reported itself stopped. (The
        # health Watch the client cancelled may log a moment later: its handler notices last.)
        after_stop = [x for x in lines[events.index("stopped"):] if str(x.get("request_id", "")).startswith("drain-")]
        assert after_stop == []
        assert not any(x.get("level") == "error" for x in lines)
    finally:
        server.close()


def _tgkill() -> Any:
    """glibc's tgkill(2): a signal to one thread of another process (Linux only)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("thread-directed signals need Linux")
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "tgkill"):
        pytest.skip("this C library has no tgkill")
    return libc.tgkill


def test_sigterm_is_handled_whichever_thread_receives_it(server_dir: ServerDir) -> None:
    """The kernel may hand a process-directed SIGTERM to any thread that does not block it; the
    server must stop gracefully even when a gRPC or worker thread, not the main one, receives it."""
    tgkill = _tgkill()
    server = Server(server_dir)
    try:
        pid = server.proc.pid
        others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
        assert others, "the server runs no other thread"
        assert tgkill(pid, others[-1], signal.SIGTERM) == 0, os.strerror(ctypes.get_errno())
        assert server.proc.wait(timeout=5 + 10) == 0
        stopping = [x for x in server_dir.log_lines() if x.get("event") == "stopping"]
        assert [x["signal"] for x in stopping] == ["SIGTERM"]
    finally:
        server.close()


@pytest.mark.parametrize("model", ["threads", "event-loop"])
def test_a_second_signal_during_the_stop_changes_nothing(server_dir: ServerDir, model: str) -> None:
    """SIGTERM, then SIGINT while the first stop still waits for a call in flight (Ctrl-C pressed
    twice; a supervisor that signals every process): one graceful stop, exit 0. (Stopping inside
    the signal handler made the second signal wait for good on the first stop, in the event-loop
    model.)"""
    from entitlement.v1 import registry_pb2, registry_pb2_grpc
    server_dir.extra_env["ENTITLEMENT_SERVER_MODEL"] = model
    server = Server(server_dir)
    release = threading.Event()
    stub = registry_pb2_grpc.RegistryServiceStub(server.channel)
    md = (("authorization", f"Bearer {server_dir.tokens['agency-feed']}"),)
    header = registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader(extracted_on=date_msg(dt.date.today())))

    def stalled_push() -> Iterator[registry_pb2.ImportExtractRequest]:
        yield header
        release.wait(60)
    try:
        # A call in flight, which the stop waits for (grace: 5 s): an agency's push whose file does
        # not come (a change stream is no longer one: a stop ends them at once). In once another
        # push is told IMPORT_IN_PROGRESS (each process takes one push at a time, from its header).
        push = stub.ImportExtract.future(stalled_push(), metadata=md, timeout=60)
        deadline = time.monotonic() + 15
        while True:
            try:
                stub.ImportExtract(iter([header]), metadata=md, timeout=10)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.ABORTED and "IMPORT_IN_PROGRESS" in str(failure(exc).reason):
                    break
            assert time.monotonic() < deadline, "the stalled push never got in"
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while not any(x.get("event") == "stopping" for x in server_dir.log_lines()):
            assert time.monotonic() < deadline, "no stopping line after SIGTERM"
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=30) == 0
        events = [x for x in server_dir.log_lines() if x.get("event") in ("serving", "stopping", "stopped")]
        assert [(x["event"], x.get("server_model", x.get("signal"))) for x in events] == [
            ("serving", model), ("stopping", "SIGTERM"), ("stopped", None)]
        push.cancel()
    finally:
        release.set()
        server.close()


@pytest.mark.parametrize("model", ["threads", "event-loop"])
def test_a_signal_once_stopped_changes_nothing(server_dir: ServerDir, model: str) -> None:
    """SIGTERM, then SIGINT as soon as the server says it stopped, while the process ends (Ctrl-C
    pressed twice, a supervisor signalling the group): exit 0 all the same. (The interpreter's
    finalization put SIGINT's default action back: killed, exit -2, seen in CI once change streams
    stopped ending the stop at once.)"""
    server_dir.extra_env["ENTITLEMENT_SERVER_MODEL"] = model
    server = Server(server_dir)
    try:
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not any(x.get("event") == "stopped" for x in server_dir.log_lines()):
            assert time.monotonic() < deadline, "no stopped line after SIGTERM"
            time.sleep(0.001)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.close()


# ------------------------------------------------------------------------------------------ INTERNAL

LEAKS = ("select", "activations", "sqlite", "no such", "traceback", "valueerror", "operationalerror", "corrupt")


def _assert_clean_error(err: grpc.RpcError, rid: str) -> None:
    f = failure(err)
    assert f.metadata == {"request_id": rid}
    everything = " ".join([f.message, f.reason, str(err.debug_error_string())]).lower()  # type: ignore[attr-defined]
    for word in LEAKS:
        assert word not in f.message.lower(), f.message
    assert "activations" not in everything.replace("activations/" + "0" * 32, "")


def test_an_unexpected_error_is_internal_and_says_nothing_but_a_request_id(server_dir: ServerDir) -> None:
    server = Server(server_dir)
    try:
        _, activation, _ = _stubs(server.channel)
        agency_id, birth = "P0002980", pool_birth(2980)
        created = activation.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
            platform="platforms/openclassrooms", reason="internal test"),
            metadata=server.metadata("advisor-paris"), timeout=10).activation
        # A row the code cannot read, written behind the server's back.
        with sqlite3.connect(server_dir.root / "entitlement.db") as conn:
            conn.execute("UPDATE activations SET start_date = 'SELECT corrupt sqlite' WHERE id = ?",
                         (created.name.split("/")[1],))
        rid = "internal-" + uuid.uuid4().hex
        with pytest.raises(grpc.RpcError) as info:
            activation.GetActivation(activation_pb2.GetActivationRequest(name=created.name),
                                     metadata=server.metadata("admin", rid), timeout=10)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert failure(info.value).reason == "INTERNAL"
        assert rid in failure(info.value).message
        _assert_clean_error(info.value, rid)

        # The operators find the cause in the log under the same request id.
        lines = [x for x in server_dir.log_lines() if x.get("request_id") == rid]
        assert [x["event"] for x in lines] == ["unhandled_exception", "rpc"]
        assert lines[0]["level"] == "error" and lines[0]["error"] == "ValueError"
        assert lines[1]["code"] == "INTERNAL"
        assert server.proc.poll() is None  # and the server keeps serving
    finally:
        server.close()


def test_a_table_dropped_behind_the_servers_back_leaks_nothing(server_dir: ServerDir) -> None:
    server = Server(server_dir)
    try:
        with sqlite3.connect(server_dir.root / "entitlement.db") as conn:
            conn.execute("DROP TABLE activations")
        rid = "dropped-" + uuid.uuid4().hex
        _, activation, _ = _stubs(server.channel)
        with pytest.raises(grpc.RpcError) as info:
            activation.GetActivation(activation_pb2.GetActivationRequest(name="activations/" + "0" * 32),
                                     metadata=server.metadata("admin", rid), timeout=10)
        code = info.value.code()
        assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
        _assert_clean_error(info.value, rid)
        [line] = [x for x in server_dir.log_lines() if x.get("request_id") == rid and x.get("event") == "rpc"]
        assert line["code"] == code.name
    finally:
        server.close()


FOURTH_PROGRAM = """
id: occitanie-numerique
title: Occitanie digital skills (example)
tier: premium
period: {start: 2019-01-01, end: 2022-12-31}
criteria: [registered, registration_active, resident_in_departments]
parameters:
  departments: {values: {2019-01-01: {value: ["31", "34"], reference: "Plan régional 2019-2022 (example)"}}}
  price_per_month_cents: {values: {2019-01-01: {value: 2000, reference: "List price"}}}
  activation_months: {values: {2019-01-01: {value: 6, reference: "Example"}}}
  funders: {values: {2019-01-01: {value: {region-occitanie: 7000, opco-akto: 3000}, reference: "Example split"}}}
"""


def test_a_fourth_program_is_served_from_a_file_alone(tmp_path: Path) -> None:
    """Adding a funder's program is writing a file: the server lists it and applies its rules."""
    programs = tmp_path / "programs"
    shutil.copytree(ROOT / "programs", programs, ignore=shutil.ignore_patterns("*.md"))
    (programs / "occitanie-numerique.yaml").write_text(FOURTH_PROGRAM)
    d = prepare(tmp_path / "srv")
    d.programs_dir = programs
    server = Server(d)
    try:
        advisor = As(server.channel, d.tokens["advisor-paris"])
        listed = advisor.ListPrograms(eligibility_pb2.ListProgramsRequest(as_of=date_msg("2020-06-01")))
        assert "programs/occitanie-numerique" in [p.name for p in listed.programs]
        [decision] = advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
            job_seeker=identity("SC000001", "1990-05-17"), program="programs/occitanie-numerique",
            as_of=date_msg("2020-06-01"))).decisions
        # SC000001 lives in Paris (75): the Occitanie program refuses on residence only.
        assert [c.reason_code for c in decision.criteria if not c.passed] == ["OUTSIDE_REGION"]
        assert {p.name for p in decision.parameters} >= {"departments", "funders"}
    finally:
        server.close()

