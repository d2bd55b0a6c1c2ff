"""Shared test helpers: test callers, the test registry, stubs per role, error inspection."""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import scenario_data
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_status import rpc_status

from entitlement.app import Context
from entitlement.callers import Caller
from entitlement.clock import FixedClock
from entitlement.server_main import Serving
from entitlement.synthetic import COLUMNS
from entitlement.v1 import (activation_pb2, activation_pb2_grpc, audit_pb2_grpc, common_pb2,
                            eligibility_pb2_grpc, registry_pb2_grpc)

TODAY = dt.date(2026, 3, 16)

CALLERS = [
    Caller(id="advisor-paris", role="advisor", advisor_id="A0001", agency_code="75011"),
    Caller(id="advisor-lyon", role="advisor", advisor_id="A0002", agency_code="69003"),
    Caller(id="platform-oc", role="platform", platform_id="openclassrooms"),
    Caller(id="platform-other", role="platform", platform_id="otherplatform"),
    Caller(id="funder-ministry", role="funder", funder_id="ministry-of-labour"),
    Caller(id="funder-ft", role="funder", funder_id="france-travail"),
    Caller(id="funder-idf", role="funder", funder_id="region-idf"),
    Caller(id="agency-feed", role="agency"),
    Caller(id="admin", role="admin"),
]

# Special people of the test registry: identifiant -> (birth, postal, registered, ended, category)
SPECIAL = {
    "ENDED01": ("1980-04-02", "69003", "2020-01-06", "2026-01-31", "1"),
    "CAT0006": ("1975-12-12", "13001", "2021-03-01", "", "6"),
    "FUTURE1": ("1999-09-09", "75011", "2026-04-01", "", "1"),
    "ENDTODAY": ("1988-08-08", "75011", "2021-01-01", TODAY.isoformat(), "2"),
    "IDF0001": ("2000-01-01", "93100", "2016-01-04", "", "1"),
}
POOL_SIZE = 3000  # eligible people handed out one per test need (P0000001 ...)


def make_registry_file(path: Path) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for ident, (birth, postal, reg, end, cat) in SPECIAL.items():
            w.writerow({"identifiant": ident, "nom": "Test", "prenom": "Special", "dateNaissance": birth,
                        "codePostal": postal, "dateInscription": reg, "dateCessationInscription": end,
                        "codeCategorieInscription": cat})
        w.writerows(scenario_data.registry_rows())
        for i in range(1, POOL_SIZE + 1):
            w.writerow({"identifiant": f"P{i:07d}", "nom": "Pool", "prenom": "Person",
                        "dateNaissance": pool_birth(i).isoformat(), "codePostal": "75011",
                        "dateInscription": "2024-01-15", "dateCessationInscription": "",
                        "codeCategorieInscription": "1"})
    return path


def pool_birth(i: int) -> dt.date:
    return dt.date(1970, 1, 1) + dt.timedelta(days=(i * 37) % 12000)


_counter = itertools.count(1)
_lock = threading.Lock()


def next_person() -> tuple[str, dt.date]:
    """A registered, eligible person no other test has used in this run."""
    with _lock:
        i = next(_counter)
    assert i <= POOL_SIZE, "test registry pool exhausted: raise POOL_SIZE"
    return f"P{i:07d}", pool_birth(i)


def date_msg(d: dt.date | str) -> date_pb2.Date:
    if isinstance(d, str):
        d = dt.date.fromisoformat(d)
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


def identity(agency_id: str, birth: dt.date | str) -> common_pb2.JobSeekerIdentity:
    return common_pb2.JobSeekerIdentity(agency_id=agency_id, birth_date=date_msg(birth))


@dataclass
class Harness:
    backend: str
    url: str
    ctx: Context
    running: Serving
    channel: grpc.Channel
    tokens: dict[str, str]
    clock: FixedClock
    log_path: Path


class As:
    """Stubs of the three services, calling as one test caller."""

    def __init__(self, channel: grpc.Channel, token: str | None) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        self._stubs = [eligibility_pb2_grpc.EligibilityServiceStub(channel),
                       activation_pb2_grpc.ActivationServiceStub(channel),
                       audit_pb2_grpc.AuditServiceStub(channel),
                       registry_pb2_grpc.RegistryServiceStub(channel)]

    def __getattr__(self, method: str) -> Any:
        for stub in self._stubs:
            if hasattr(stub, method):
                fn = getattr(stub, method)

                def call(request: Any, **kw: Any) -> Any:
                    kw.setdefault("metadata", self.metadata)
                    kw.setdefault("timeout", 15)
                    return fn(request, **kw)
                return call
        raise AttributeError(method)


@dataclass
class Api:
    h: Harness
    _cache: dict[str, As] = field(default_factory=dict)

    def as_(self, caller_id: str | None) -> As:
        key = caller_id or ""
        if key not in self._cache:
            self._cache[key] = As(self.h.channel, self.h.tokens[caller_id] if caller_id else None)
        return self._cache[key]

    @property
    def advisor(self) -> As:
        return self.as_("advisor-paris")

    @property
    def platform(self) -> As:
        return self.as_("platform-oc")

    @property
    def admin(self) -> As:
        return self.as_("admin")

    def activate(self, agency_id: str | None = None, birth: dt.date | None = None, *, program: str = "premium-job-seekers",
                 caller: str = "advisor-paris", request_id: str = "", reason: str = "test") -> activation_pb2.ActivateEntitlementResponse:
        if agency_id is None:
            agency_id, birth = next_person()
        assert birth is not None
        return self.as_(caller).ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            request_id=request_id, job_seeker=identity(agency_id, birth), program=f"programs/{program}",
            platform="platforms/openclassrooms", reason=reason))


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    fields: dict[str, str]


def failure(err: grpc.RpcError) -> Failure:
    """Decode an AIP-193 error: code, message, ErrorInfo and BadRequest field violations."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    reason, metadata, fields = "", {}, {}
    if status is not None:
        for d in status.details:
            if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                d.Unpack(info)
                assert info.domain == "entitlement.v1"
                reason, metadata = info.reason, dict(info.metadata)
            elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                d.Unpack(bad)
                fields = {v.field: v.description for v in bad.field_violations}
    return Failure(err.code(), err.details() or "", reason, metadata, fields)


def expect_error(fn: Any, request: Any, code: grpc.StatusCode, **kw: Any) -> Failure:
    try:
        fn(request, **kw)
    except grpc.RpcError as err:
        f = failure(err)
        assert f.code == code, f"expected {code.name}, got {f.code.name}: {f.message}"
        return f
    raise AssertionError(f"expected {code.name}, the call succeeded")


def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 20.0) -> None:
    """Polls `condition` until it holds; fails the test, naming `what`, after `limit_s`."""
    limit = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < limit, f"still not true after {limit_s:g} s: {what}"
        time.sleep(0.005)


def log_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a server's log written so far: whole lines only (the text after the last newline may be
    a record the server is still writing; parsing it failed now and then in CI)."""
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.startswith("{")]


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real filesystem of `size` (tmpfs, e.g. "32k", "32m") mounted at `where`, to fill; the test
    skips where this user may not mount one. Unmounted afterwards."""
    import pytest
    where.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"a full filesystem needs a tmpfs mount, which this user may not make: {made.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextmanager
def sqlite_writer_sees(url: str, query: str) -> Iterator[list[Any]]:
    """Another writer of a SQLite file, as a server's are: every 2 ms it tries the write lock
    (BEGIN IMMEDIATE, no wait) and, when it gets it, runs `query` (one value) and lets go. Yields
    the values it saw, in order, complete once the block ends. `url`: sqlite:///PATH; any other URL
    (PostgreSQL) sees nothing (an empty list)."""
    seen: list[Any] = []
    stop = threading.Event()

    def poll() -> None:
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
        try:
            while not stop.is_set():
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError:  # locked: someone else writes
                    stop.wait(0.002)
                    continue
                seen.append(conn.execute(query).fetchone()[0])
                conn.execute("ROLLBACK")
                stop.wait(0.002)
        finally:
            conn.close()
    poller = threading.Thread(target=poll, daemon=True) if url.startswith("sqlite:///") else None
    if poller:
        poller.start()
    try:
        yield seen
    finally:
        stop.set()
        if poller:
            poller.join(10)
