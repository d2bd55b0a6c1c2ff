"""Step 5, on both backends: callers managed in the database (create, rotate with an overlap, revoke,
expiry, the lookup cache, two operators at once on one id), the `entitlement callers` commands,
credentials refused as they should be, TLS and mutual TLS (a certificate from another CA refused, a
platform known by its certificate), the CLI over TLS, the refusal to serve plaintext on a
non-loopback address, and the per-caller rate limit with its RetryInfo. Each group runs on a server
of its own."""

from __future__ import annotations

import datetime as dt
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import select

from own_server import next_ledger_person, on_day, own_server
from support import As, Failure, Harness, expect_error, failure, identity

from entitlement import app, cli, credentials
from entitlement.api.ratelimit import TokenBuckets
from entitlement.callers import TOKEN_RE, Caller, CallerDirectory, Directory, make_caller, new_token, token_hash
from entitlement.config import ROOT
from entitlement.errors import Unauthenticated
from entitlement.server_main import start
from entitlement.storage.db import Database
from entitlement.storage.models import CallerCredential, Event
from entitlement.tls import Authority, TransportError, check_transport, is_loopback, make_ca
from entitlement.v1 import activation_pb2, audit_pb2, eligibility_pb2

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
OPERATOR = "operator:test"


def check_request() -> eligibility_pb2.CheckEligibilityRequest:
    agency_id, birth = next_ledger_person()
    return eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(agency_id, birth),
                                                   program="programs/premium-job-seekers")


def as_token(h: Harness, token: str) -> As:
    return As(h.channel, token)


def refused(h: Harness, token: str, reason: str) -> Failure:
    f = expect_error(as_token(h, token).ListPrograms, eligibility_pb2.ListProgramsRequest(), UNAUTH)
    assert f.reason == reason, f
    assert token not in f.message
    return f


def works(h: Harness, token: str) -> None:
    as_token(h, token).ListPrograms(eligibility_pb2.ListProgramsRequest())


# ------------------------------------------------------------------------- callers in the database

@pytest.fixture(scope="module")
def managed(backend: tuple[str, str], tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Harness]:
    """A server whose token lookups are cached for 1 s."""
    root = tmp_path_factory.mktemp(f"managed-{backend[0]}")
    with own_server(backend[0], root, request, caller_cache_seconds=1) as h:
        yield h


def create(h: Harness, caller: Caller, expires_in: dt.timedelta | None = None) -> str:
    return credentials.create(h.ctx.db, caller, now=h.clock.now(), actor=OPERATOR, expires_in=expires_in,
                              file=h.ctx.callers.file).token


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns() % 10**12}"


def test_a_created_caller_works_at_once_with_its_role_and_scope(managed: Harness) -> None:
    h = managed
    token = create(h, make_caller(unique("adv"), "advisor", advisor_id="A0101", agency_code="75011"))
    resp = as_token(h, token).CheckEligibility(check_request())
    assert resp.decisions[0].eligible
    agency_id, birth = next_ledger_person()
    created = as_token(h, token).ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="db caller"))
    assert created.activation.agency_code == "75011" and created.activation.advisor_id == "A0101"
    # The role table applies to database callers like to the file's.
    funder = create(h, make_caller(unique("fund"), "funder", funder_id="ministry-of-labour"))
    f = expect_error(as_token(h, funder).CheckEligibility, check_request(), grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "ROLE_NOT_ALLOWED"
    # The file's callers (the bootstrap source) keep working beside them.
    works(h, h.tokens["advisor-paris"])


def test_only_a_hash_of_the_token_is_stored_and_events_carry_neither(managed: Harness) -> None:
    h = managed
    caller_id = unique("plat")
    token = create(h, make_caller(caller_id, "platform", platform_id="openclassrooms"))
    new = credentials.rotate(h.ctx.db, caller_id, now=h.clock.now(), actor=OPERATOR,
                             overlap=dt.timedelta(hours=1)).token
    credentials.revoke(h.ctx.db, caller_id, now=h.clock.now(), actor=OPERATOR, reason="left")
    from sqlalchemy import select
    with h.ctx.db.read() as s:
        rows = s.execute(select(CallerCredential).where(CallerCredential.caller_id == caller_id)).scalars().all()
        events = s.execute(select(Event).where(Event.subject == f"callers/{caller_id}").order_by(Event.seq)
                           ).scalars().all()
    assert {r.token_sha256 for r in rows} == {token_hash(token), token_hash(new)}
    assert [e.type for e in events] == ["caller.created", "caller.rotated", "caller.revoked"]
    assert {e.actor for e in events} == {OPERATOR}
    for e in events:
        for secret in (token, new, token_hash(token), token_hash(new)):
            assert secret not in e.payload_json
    assert json.loads(events[0].payload_json)["scope"] == {"platform": "openclassrooms"}
    # An admin reads them in the event log; a funder does not (not about a program it funds).
    admin = As(h.channel, h.tokens["admin"]).ListEvents(audit_pb2.ListEventsRequest(page_size=1000))
    assert {f"callers/{caller_id}"} <= {e.subject for e in admin.events}
    funder = As(h.channel, h.tokens["funder-ministry"]).ListEvents(audit_pb2.ListEventsRequest(page_size=1000))
    assert not [e for e in funder.events if e.subject.startswith("callers/")]


def test_an_expired_token_is_unauthenticated(managed: Harness) -> None:
    h = managed
    token = create(h, make_caller(unique("adv"), "advisor", advisor_id="A0102", agency_code="75011"),
                   expires_in=dt.timedelta(days=1))
    works(h, token)
    with on_day(h, h.clock.today() + dt.timedelta(days=2)):  # the cached row is checked against the clock
        refused(h, token, "CREDENTIALS_EXPIRED")
    works(h, token)


def test_a_rotated_token_works_for_the_overlap_then_stops(managed: Harness) -> None:
    h = managed
    caller_id = unique("adv")
    old = create(h, make_caller(caller_id, "advisor", advisor_id="A0103", agency_code="69003"))
    works(h, old)
    new = credentials.rotate(h.ctx.db, caller_id, now=h.clock.now(), actor=OPERATOR,
                             overlap=dt.timedelta(hours=1)).token
    time.sleep(1.1)  # past the cache
    works(h, old)
    works(h, new)
    h.clock.advance(dt.timedelta(hours=2))
    try:
        refused(h, old, "CREDENTIALS_EXPIRED")
        works(h, new)
        # The new token has the same caller, role and scope.
        created = as_token(h, new).ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(*next_ledger_person()), program="programs/premium-job-seekers",
            platform="platforms/openclassrooms", reason="rotated"))
        assert created.activation.agency_code == "69003" and created.activation.advisor_id == "A0103"
    finally:
        h.clock.advance(-dt.timedelta(hours=2))


def test_a_revoked_caller_is_refused_within_the_cache_time(managed: Harness) -> None:
    h = managed
    caller_id = unique("adv")
    token = create(h, make_caller(caller_id, "advisor", advisor_id="A0104", agency_code="75011"))
    works(h, token)
    rotated = credentials.rotate(h.ctx.db, caller_id, now=h.clock.now(), actor=OPERATOR,
                                 overlap=dt.timedelta(hours=1)).token
    revoked_at = time.monotonic()
    assert credentials.revoke(h.ctx.db, caller_id, now=h.clock.now(), actor=OPERATOR) == 2
    deadline = revoked_at + h.ctx.settings.caller_cache_seconds + 0.5
    time.sleep(max(0.0, deadline - time.monotonic()))
    refused(h, token, "CREDENTIALS_REVOKED")  # every token of the caller, the rotated one too
    refused(h, rotated, "CREDENTIALS_REVOKED")
    with pytest.raises(credentials.CallerError, match="revoked already"):
        credentials.revoke(h.ctx.db, caller_id, now=h.clock.now(), actor=OPERATOR)
    with pytest.raises(credentials.CallerError, match="no usable token"):
        credentials.rotate(h.ctx.db, caller_id, now=h.clock.now(), actor=OPERATOR, overlap=dt.timedelta(0))


def test_a_token_refused_once_works_as_soon_as_its_caller_exists(managed: Harness,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown token is not remembered: it was, for the cache time, so a caller created just
    after a failed attempt with its token stayed refused that long."""
    h = managed
    token = new_token()
    refused(h, token, "CREDENTIALS_INVALID")
    assert "t:" + token_hash(token) not in h.ctx.callers._cache
    monkeypatch.setattr(credentials, "new_token", lambda: token)  # the token the operator is given
    create(h, make_caller(unique("adv"), "advisor", advisor_id="A0106", agency_code="75011"))
    works(h, token)


def test_random_tokens_do_not_push_real_callers_out_of_the_cache(managed: Harness,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown tokens took places in the bounded cache, the oldest entries going first: a stream of
    random tokens made every real caller's next call read the database again."""
    h = managed
    token = create(h, make_caller(unique("adm"), "admin"))
    works(h, token)
    key = "t:" + token_hash(token)
    assert key in h.ctx.callers._cache
    monkeypatch.setattr(h.ctx.callers, "MAX_ENTRIES", 20)
    for _ in range(50):
        refused(h, new_token(), "CREDENTIALS_INVALID")
    assert key in h.ctx.callers._cache


def test_caller_ids_are_never_reused(managed: Harness) -> None:
    h = managed
    caller_id = unique("adv")
    create(h, make_caller(caller_id, "advisor", advisor_id="A0105", agency_code="75011"))
    with pytest.raises(credentials.CallerError, match="exists already"):
        create(h, make_caller(caller_id, "funder", funder_id="region-idf"))
    with pytest.raises(credentials.CallerError, match="credentials file"):
        create(h, make_caller("advisor-paris", "advisor", advisor_id="A9", agency_code="75011"))
    with pytest.raises(ValueError, match="agency_code"):
        make_caller("x1", "advisor", advisor_id="A1")
    with pytest.raises(ValueError, match="has no platform"):
        make_caller("x1", "funder", funder_id="f", platform_id="p")


def test_an_id_both_in_the_file_and_in_the_database_is_refused(backend: tuple[str, str], tmp_path: Path,
                                                                request: pytest.FixtureRequest) -> None:
    """One id, two callers (roles and scopes of their own, one rate limit, one set of idempotency
    records): a database caller made with an id of the file by an operator whose `callers create`
    did not see the file. The server started, and served both."""
    with own_server(backend[0], tmp_path / "shared", request) as h:
        token = credentials.create(h.ctx.db, make_caller("funder-idf", "admin"), now=h.clock.now(),
                                   actor=OPERATOR).token  # without `file`: the operator's own settings
        f = expect_error(as_token(h, token).ListPrograms, eligibility_pb2.ListProgramsRequest(),
                         grpc.StatusCode.PERMISSION_DENIED)
        assert f.reason == "CALLER_MISCONFIGURED" and "credentials file" in f.message
        works(h, h.tokens["funder-idf"])  # the file's caller keeps its id
        with pytest.raises(SystemExit, match="funder-idf"):  # and a server no longer starts
            app.build(h.ctx.settings, clock=h.clock)


def test_the_credentials_file_holds_one_caller_per_id_and_one_entry_per_token(tmp_path: Path) -> None:
    """Two entries of one id with other roles or scopes loaded as two callers under one id (the
    later one also named by a client certificate), and two entries of one token kept the later
    one only: both are refused at load now, naming the entries."""
    path = tmp_path / "callers.json"

    def entry(caller: Caller, token: str) -> dict[str, str]:
        return {**{k: v for k, v in vars(caller).items() if v}, "token_sha256": token_hash(token)}

    advisor = Caller(id="x1", role="advisor", advisor_id="A1", agency_code="75011")
    admin = Caller(id="x1", role="admin")
    path.write_text(json.dumps({"callers": [entry(advisor, "a" * 43), entry(admin, "b" * 43)]}))
    with pytest.raises(SystemExit, match=r"callers\[1\]\.id: x1 is callers\[0\] already"):
        CallerDirectory.load(path)
    other = Caller(id="x2", role="admin")
    path.write_text(json.dumps({"callers": [entry(advisor, "a" * 43), entry(other, "a" * 43)]}))
    with pytest.raises(SystemExit, match=r"callers\[1\]\.token_sha256: the token of callers\[0\] too"):
        CallerDirectory.load(path)
    # Two tokens of one caller are fine.
    path.write_text(json.dumps({"callers": [entry(advisor, "a" * 43), entry(advisor, "c" * 43)]}))
    file = CallerDirectory.load(path)
    assert file.resolve("a" * 43) == file.resolve("c" * 43) == advisor


# Two operators at once on one caller id (PostgreSQL, READ COMMITTED, was the racy one: the row locks
# of `credentials._rows` left a create with nothing to lock, and a revocation blind to the rows a
# rotation it waited on had added). `_rows` is wrapped to hold the first command inside its
# transaction while the second one starts; on SQLite the writers queue as before.

NOW = dt.datetime(2026, 3, 16, 10, tzinfo=dt.timezone.utc)


def test_two_creates_of_one_id_at_once_make_one_caller(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    both_looked = threading.Barrier(2, timeout=2)
    original = credentials._rows

    def rows_then_wait(s: Any, caller_id: str) -> Any:
        found = original(s, caller_id)
        try:
            both_looked.wait()  # until the other operator's transaction has looked for the id too...
        except threading.BrokenBarrierError:
            pass  # ...unless it cannot before this one ends (it waits on the id's lock)
        return found
    monkeypatch.setattr(credentials, "_rows", rows_then_wait)
    results: dict[str, object] = {}

    def create(role: str, **scope: str) -> None:
        try:
            results[role] = credentials.create(db, make_caller("shared-id", role, **scope), now=NOW, actor=OPERATOR)
        except Exception as exc:  # noqa: BLE001
            results[role] = exc
    threads = [threading.Thread(target=create, args=("advisor",), kwargs={"advisor_id": "A1", "agency_code": "75011"}),
               threading.Thread(target=create, args=("admin",))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    with db.read() as s:
        roles = sorted(r.role for r in s.execute(select(CallerCredential).where(
            CallerCredential.caller_id == "shared-id")).scalars())
    assert len(roles) == 1, f"one caller id, two callers: {roles}; results {results}"
    refused_one = results["admin" if roles == ["advisor"] else "advisor"]
    assert isinstance(refused_one, credentials.CallerError) and "exists already" in str(refused_one), results


def test_a_revocation_racing_a_rotation_stops_the_new_token_too(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials.create(db, make_caller("raced", "platform", platform_id="openclassrooms"), now=NOW, actor=OPERATOR)
    rotation_holds_the_rows = threading.Event()
    original = credentials._rows

    def rows(s: Any, caller_id: str) -> Any:
        found = original(s, caller_id)
        if threading.current_thread().name == "rotate":
            rotation_holds_the_rows.set()
            time.sleep(1.0)  # the revocation starts meanwhile, and waits for the rotation
        return found
    monkeypatch.setattr(credentials, "_rows", rows)
    issued: list[credentials.Issued] = []
    rotate = threading.Thread(name="rotate", target=lambda: issued.append(credentials.rotate(
        db, "raced", now=NOW, actor=OPERATOR, overlap=dt.timedelta(minutes=60))))
    rotate.start()
    assert rotation_holds_the_rows.wait(10)
    usable = credentials.revoke(db, "raced", now=NOW, actor=OPERATOR, reason="leaked")
    rotate.join(30)
    assert issued
    directory = Directory(CallerDirectory.empty(), db, lambda: NOW + dt.timedelta(minutes=10), ttl_seconds=0)
    with pytest.raises(Unauthenticated) as exc:
        directory.authenticate(issued[0].token)  # the rotation's new token stopped with the others
    assert exc.value.reason == "CREDENTIALS_REVOKED"
    assert usable == 2  # it found both tokens of the rotation it waited for


def test_an_agency_code_is_what_an_activation_stores_and_a_listing_filters_on(managed: Harness) -> None:
    """An advisor's agency code is stored with every activation it makes (16 characters) and is
    ListActivations' filter: a longer one is refused when the caller is made (it answered INTERNAL at
    every activation on PostgreSQL), and any code a caller may have can be filtered on ('-', '.')."""
    h = managed
    with pytest.raises(ValueError, match="agency_code: required, 1 to 16"):
        make_caller(unique("adv"), "advisor", advisor_id="A0106", agency_code="AGENCY-IDF-PARIS-11")
    code = "IDF-PARIS.11_B"
    token = create(h, make_caller(unique("adv"), "advisor", advisor_id="A0107", agency_code=code))
    agency_id, birth = next_ledger_person()
    created = as_token(h, token).ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="agency code"))
    assert created.activation.agency_code == code
    listed = As(h.channel, h.tokens["admin"]).ListActivations(audit_pb2.ListActivationsRequest(agency_code=code))
    assert [a.name for a in listed.activations] == [created.activation.name]
    f = expect_error(As(h.channel, h.tokens["admin"]).ListActivations,
                     audit_pb2.ListActivationsRequest(agency_code="A" * 17), grpc.StatusCode.INVALID_ARGUMENT)
    assert "agency_code" in f.message


def test_an_advisor_stored_with_a_too_long_agency_code_is_refused_clearly(managed: Harness) -> None:
    """Made before agency codes were held to 16 characters (as activations store them), such an
    advisor answered INTERNAL at every activation on PostgreSQL: now PERMISSION_DENIED
    `CALLER_MISCONFIGURED` at once, on both backends, with nothing written."""
    h = managed
    old = Caller(id=unique("adv"), role="advisor", advisor_id="A0108", agency_code="AGENCY-IDF-PARIS-11")
    token = create(h, old)  # as an earlier version stored it
    agency_id, birth = next_ledger_person()
    f = expect_error(as_token(h, token).ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="old caller"), grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "CALLER_MISCONFIGURED" and "agency code" in f.message


@pytest.mark.parametrize("header,reason", [
    (None, "CREDENTIALS_MISSING"),
    ("Bearer ", "CREDENTIALS_INVALID"),
    ("Bearer", "CREDENTIALS_INVALID"),
    ("Basic dXNlcjpwYXNz", "CREDENTIALS_INVALID"),
    ("Bearer short", "CREDENTIALS_INVALID"),
    ("Bearer " + "A" * 600, "CREDENTIALS_INVALID"),
    ("Bearer has spaces in the token", "CREDENTIALS_INVALID"),
    ("Bearer ' OR 1=1 --aaaaaaaaaaaaaa", "CREDENTIALS_INVALID"),
    ("Bearer aGVsbG8gd29ybGQgdGhpcyBpcyBub3QgYSB0b2tlbg", "CREDENTIALS_INVALID"),
])
def test_missing_and_malformed_credentials_are_unauthenticated(managed: Harness, header: str | None,
                                                               reason: str) -> None:
    md = (("authorization", header),) if header is not None else ()
    for method, request in (("ListPrograms", eligibility_pb2.ListProgramsRequest()),
                            ("CheckEligibility", check_request()),
                            ("ListEvents", audit_pb2.ListEventsRequest())):
        f = expect_error(getattr(As(managed.channel, None), method), request, UNAUTH, metadata=md)
        assert f.reason == reason
        assert not f.fields  # refused before validation


# ------------------------------------------------------------------------- the lookup cache

class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_directory_caches_lookups_for_its_ttl(tmp_path: Path) -> None:
    from entitlement.storage.db import Database
    from entitlement.storage.migrate import upgrade
    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    db = Database(url, pool_size=2)
    now = dt.datetime(2026, 3, 16, 10, tzinfo=dt.timezone.utc)
    mono = FakeTime()
    reads = 0
    directory = Directory(CallerDirectory.empty(), db, lambda: now, ttl_seconds=10, monotonic=mono)
    original = directory._by_hash

    def counting(digest: str) -> Any:
        nonlocal reads
        reads += 1
        return original(digest)
    directory._by_hash = counting  # type: ignore[method-assign]
    try:
        token = credentials.create(db, make_caller("a1", "admin"), now=now, actor=OPERATOR).token
        for _ in range(5):
            assert directory.authenticate(token).id == "a1"
        assert reads == 1  # one database read for five calls
        credentials.revoke(db, "a1", now=now, actor=OPERATOR)
        mono.t = 9.9
        assert directory.authenticate(token).id == "a1"  # still cached: revocation within the TTL
        mono.t = 10.1
        with pytest.raises(Unauthenticated) as exc:
            directory.authenticate(token)
        assert exc.value.reason == "CREDENTIALS_REVOKED" and reads == 2
        for _ in range(3):  # unknown tokens are not remembered: one read per attempt
            with pytest.raises(Unauthenticated):
                directory.authenticate("x" * 43)
        assert reads == 5
    finally:
        db.dispose()


# ------------------------------------------------------------------------- the callers commands

@dataclass(frozen=True)
class Out:
    code: int
    out: str
    err: str


@pytest.fixture
def operator(managed: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", managed.url)
    monkeypatch.setenv("ENTITLEMENT_CALLERS_FILE", str(managed.ctx.settings.callers_file))

    def run(*argv: str) -> Out:
        capsys.readouterr()  # drop what came before (a server's log lines when no harness set logging up)
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return Out(code, captured.out, captured.err)
    return run


def test_callers_commands(managed: Harness, operator: Any) -> None:
    h = managed
    caller_id = unique("cli-plat")
    r = operator("callers", "create", caller_id, "--role", "platform", "--platform", "openclassrooms",
                 "--expires-days", "30", "--operator", "alice")
    assert r.code == 0, r.err
    token = r.out.strip()
    assert len(token) == 43 and "\n" not in token  # the token alone on stdout, shown once
    works(h, token)
    listed = operator("callers", "list", "--json")
    rows = {c["id"]: c for c in json.loads(listed.out)["callers"]}
    assert rows[caller_id]["state"] == "active" and rows[caller_id]["source"] == "database"
    assert rows["advisor-paris"]["source"] == "file"
    assert token not in listed.out and token_hash(token) not in listed.out
    table = operator("callers", "list")
    assert caller_id in table.out and "platform:openclassrooms" in table.out

    r = operator("callers", "rotate", caller_id, "--overlap-minutes", "30", "--operator", "alice")
    assert r.code == 0, r.err
    new = r.out.strip()
    assert new != token
    time.sleep(1.1)
    works(h, new)
    works(h, token)  # within the overlap (the CLI's clock is the real one, later than the server's)
    listed_now = {c["id"]: c for c in json.loads(operator("callers", "list", "--json").out)["callers"]}
    assert listed_now[caller_id]["usable_tokens"] == 2  # old and new tokens during the overlap

    r = operator("callers", "revoke", caller_id, "--reason", "contract ended", "--operator", "alice")
    assert r.code == 0 and "revoked" in r.out
    time.sleep(1.1)
    refused(h, new, "CREDENTIALS_REVOKED")
    refused(h, token, "CREDENTIALS_REVOKED")

    assert operator("callers", "create", caller_id, "--role", "admin").code == 1
    bad = operator("callers", "create", "x-adv", "--role", "advisor", "--advisor", "A1")
    assert bad.code == 1 and "agency_code" in bad.err
    assert operator("callers", "rotate", "nobody-here").code == 1
    from sqlalchemy import select
    with h.ctx.db.read() as s:
        actors = set(s.execute(select(Event.actor).where(Event.subject == f"callers/{caller_id}")).scalars())
    assert actors == {"operator:alice"}


# ------------------------------------------------------------------------- TLS and mutual TLS

@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path
    wrong_dir: Path

    def pair(self, caller: str, wrong: bool = False) -> tuple[bytes, bytes]:
        d = self.wrong_dir if wrong else self.dir
        return (d / f"{caller}.crt").read_bytes(), (d / f"{caller}.key").read_bytes()

    def channel(self, port: int, client: str | None = None, wrong: bool = False) -> grpc.Channel:
        cert, key = self.pair(client, wrong) if client else (None, None)
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(), private_key=key,
                                             certificate_chain=cert)
        return grpc.secure_channel(f"127.0.0.1:{port}", creds)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    root = tmp_path_factory.mktemp("pki")
    made = make_ca(root / "ca", ["platform-oc", "platform-other", "advisor-paris", "unknown-caller"])
    make_ca(root / "wrong", ["platform-oc"])  # another CA, certificates with the same names
    return PKI(made.dir, made.ca_cert, root / "wrong")


def tls_settings(pki: PKI, mutual: bool) -> dict[str, Any]:
    return {"tls_cert_file": str(pki.dir / "server.crt"), "tls_key_file": str(pki.dir / "server.key"),
            "tls_client_ca_file": str(pki.ca) if mutual else ""}


@pytest.fixture(scope="module")
def tls_server(backend: tuple[str, str], tmp_path_factory: pytest.TempPathFactory, pki: PKI,
               request: pytest.FixtureRequest) -> Iterator[Harness]:
    root = tmp_path_factory.mktemp(f"tls-{backend[0]}")
    with own_server(backend[0], root, request, make_channel=pki.channel, **tls_settings(pki, mutual=False)) as h:
        yield h


@pytest.fixture(scope="module")
def mtls_server(backend: tuple[str, str], tmp_path_factory: pytest.TempPathFactory, pki: PKI,
                request: pytest.FixtureRequest) -> Iterator[Harness]:
    root = tmp_path_factory.mktemp(f"mtls-{backend[0]}")
    with own_server(backend[0], root, request, make_channel=lambda port: pki.channel(port, "advisor-paris"),
                    **tls_settings(pki, mutual=True)) as h:
        yield h


def unavailable(channel: grpc.Channel, token: str | None = None) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        As(channel, token).ListPrograms(eligibility_pb2.ListProgramsRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_server_serves_over_tls_only(tls_server: Harness) -> None:
    h = tls_server
    resp = As(h.channel, h.tokens["advisor-paris"]).CheckEligibility(check_request())
    assert resp.decisions[0].eligible
    with grpc.insecure_channel(f"127.0.0.1:{h.running.port}") as plain:
        unavailable(plain, h.tokens["advisor-paris"])


def test_cli_client_over_tls(tls_server: Harness, pki: PKI, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    h = tls_server
    for name in ("ENTITLEMENT_TOKEN", "ENTITLEMENT_ADDRESS", "ENTITLEMENT_CA_FILE", "ENTITLEMENT_CLIENT_CERT_FILE",
                 "ENTITLEMENT_CLIENT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    agency_id, birth = next_ledger_person()
    address = f"127.0.0.1:{h.running.port}"
    argv = ["check", agency_id, birth.isoformat(), "--program", "premium-job-seekers", "--address", address,
            f"--token={h.tokens['advisor-paris']}"]
    assert cli.main([*argv, "--ca", str(pki.ca)]) == 0
    assert "ELIGIBLE" in capsys.readouterr().out
    monkeypatch.setenv("ENTITLEMENT_CA_FILE", str(pki.ca))  # or from the environment
    assert cli.main(argv) == 0
    capsys.readouterr()
    monkeypatch.delenv("ENTITLEMENT_CA_FILE")
    assert cli.main([*argv, "--timeout", "3"]) == 1  # plaintext to a TLS server
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert cli.main([*argv, "--ca", str(pki.wrong_dir / "ca.crt"), "--timeout", "3"]) == 1  # server not trusted
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert cli.main([*argv, "--cert", str(pki.dir / "platform-oc.crt")]) == 1
    assert "--ca" in capsys.readouterr().err


def test_mtls_platform_is_known_by_its_certificate(mtls_server: Harness, pki: PKI) -> None:
    h = mtls_server
    port = h.running.port
    # An advisor: certificate for the channel, token for the identity.
    advisor = As(h.channel, h.tokens["advisor-paris"])
    agency_id, birth = next_ledger_person()
    created = advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="mtls"))
    with pki.channel(port, "platform-oc") as channel:
        platform = As(channel, None)  # no bearer token: the certificate says who calls
        status = platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=created.activation_token, account_id="mtls-learner"))
        assert status.active
        assert platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id="mtls-learner")).active
        # A token naming another caller than the certificate is refused.
        f = expect_error(As(channel, h.tokens["platform-other"]).VerifyEntitlement,
                         activation_pb2.VerifyEntitlementRequest(account_id="mtls-learner"), UNAUTH)
        assert f.reason == "CREDENTIALS_MISMATCH"
        # The same token as the certificate's caller is fine.
        As(channel, h.tokens["platform-oc"]).VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(
            account_id="mtls-learner"))
    with pki.channel(port, "platform-other") as channel:  # the other platform sees nothing of it
        assert not As(channel, None).VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(
            account_id="mtls-learner")).active
    # Certificates that name no platform caller identify nobody: the token is needed.
    for client in ("advisor-paris", "unknown-caller"):
        with pki.channel(port, client) as channel:
            f = expect_error(As(channel, None).ListPrograms, eligibility_pb2.ListProgramsRequest(), UNAUTH)
            assert f.reason == "CREDENTIALS_MISSING"


def test_mtls_refuses_clients_without_a_certificate_of_its_ca(mtls_server: Harness, pki: PKI) -> None:
    port = mtls_server.running.port
    token = mtls_server.tokens["platform-oc"]
    with pki.channel(port, "platform-oc", wrong=True) as channel:  # same name, another CA
        unavailable(channel, token)
    with pki.channel(port) as channel:  # no client certificate
        unavailable(channel, token)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        unavailable(channel, token)


def test_mtls_revoked_platform_certificate_no_longer_identifies(mtls_server: Harness, pki: PKI) -> None:
    """A platform managed in the database: its certificate identifies it while it has a usable
    token; revoking the caller stops the certificate too."""
    h = mtls_server
    credentials.create(h.ctx.db, make_caller("platform-db", "platform", platform_id="openclassrooms"),
                       now=h.clock.now(), actor=OPERATOR)
    # A certificate for platform-db from the server's CA, naming it by its CN only (no URI SAN).
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    ca = Authority(serialization.load_pem_private_key((pki.dir / "ca.key").read_bytes(), None),  # type: ignore[arg-type]
                   x509.load_pem_x509_certificate(pki.ca.read_bytes()))
    cert_pem, key_pem = ca.issue("platform-db", server=False)
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes(), private_key=key_pem,
                                         certificate_chain=cert_pem)
    with grpc.secure_channel(f"127.0.0.1:{h.running.port}", creds) as channel:
        assert not As(channel, None).VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(
            account_id="nobody")).active
        credentials.revoke(h.ctx.db, "platform-db", now=h.clock.now(), actor=OPERATOR)
        h.ctx.callers.forget()
        f = expect_error(As(channel, None).VerifyEntitlement, activation_pb2.VerifyEntitlementRequest(
            account_id="nobody"), UNAUTH)
        assert f.reason == "CREDENTIALS_MISSING"


# ------------------------------------------------------------------------- plaintext refused

@pytest.mark.parametrize("listen,loopback", [
    ("127.0.0.1:50051", True), ("127.8.9.1:1", True), ("localhost:50051", True), ("[::1]:50051", True),
    ("0.0.0.0:50051", False), ("[::]:50051", False), ("10.1.2.3:50051", False), ("example.org:443", False),
])
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def test_plaintext_on_a_non_loopback_address_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="ENTITLEMENT_INSECURE"):
        check_transport("0.0.0.0:50051", None, insecure=False)
    check_transport("0.0.0.0:50051", None, insecure=True)  # TLS terminated in front: the operator says so
    check_transport("127.0.0.1:50051", None, insecure=False)


def test_start_refuses_before_listening(managed: Harness) -> None:
    import dataclasses
    ctx = dataclasses.replace(managed.ctx, settings=dataclasses.replace(managed.ctx.settings, listen="0.0.0.0:0"))
    with pytest.raises(TransportError):
        start(ctx, "0.0.0.0:0")


def test_server_py_refuses_plaintext_on_all_interfaces(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ENTITLEMENT_LISTEN": "0.0.0.0:50999",
           "ENTITLEMENT_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    r = subprocess.run([sys.executable, "server.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "refusing to serve without TLS on 0.0.0.0:50999" in r.stderr
    assert "ENTITLEMENT_TLS_CERT_FILE" in r.stderr and "Traceback" not in r.stderr
    env["ENTITLEMENT_TLS_CERT_FILE"] = str(tmp_path / "missing.crt")
    r = subprocess.run([sys.executable, "server.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "ENTITLEMENT_TLS_KEY_FILE" in r.stderr


def test_make_ca_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography import x509
    from entitlement.api.identity import certificate_caller_id
    assert cli.main(["tls", "make-ca", str(tmp_path / "ca"), "--client", "platform-oc"]) == 0
    out = capsys.readouterr().out
    assert "ENTITLEMENT_TLS_CLIENT_CA_FILE" in out
    for name in ("ca.key", "server.key", "platform-oc.key"):
        assert (tmp_path / "ca" / name).stat().st_mode & 0o777 == 0o600
    server = x509.load_pem_x509_certificate((tmp_path / "ca" / "server.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert certificate_caller_id((tmp_path / "ca" / "platform-oc.crt").read_bytes()) == "platform-oc"
    assert cli.main(["tls", "make-ca", str(tmp_path / "ca")]) == 1  # never overwrites a CA by surprise
    assert cli.main(["tls", "make-ca", str(tmp_path / "ca2"), "--client", "../escape"]) == 1


# ------------------------------------------------------------------------- rate limits

@pytest.fixture(scope="module")
def limited(backend: tuple[str, str], tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Harness]:
    root = tmp_path_factory.mktemp(f"limited-{backend[0]}")
    with own_server(backend[0], root, request, check_rate_per_min=6, check_burst=2) as h:
        yield h


def retry_delay(err: grpc.RpcError) -> float:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for d in status.details:
        if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            d.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    raise AssertionError("no RetryInfo")


def test_checks_and_activations_are_rate_limited_per_caller(limited: Harness) -> None:
    h = limited
    paris = As(h.channel, h.tokens["advisor-paris"])
    paris.CheckEligibility(check_request())
    paris.CheckEligibility(check_request())  # the burst of 2
    with pytest.raises(grpc.RpcError) as exc:
        paris.CheckEligibility(check_request())
    f = failure(exc.value)
    assert f.code == grpc.StatusCode.RESOURCE_EXHAUSTED and f.reason == "RATE_LIMITED"
    delay = retry_delay(exc.value)
    assert 5.0 < delay <= 10.0  # 6 a minute: one token every 10 s
    assert f.metadata["limit_per_minute"] == "6"
    # Activations draw on the same bucket.
    agency_id, birth = next_ledger_person()
    f = expect_error(paris.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="limited"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert f.reason == "RATE_LIMITED"
    # Other RPCs and other callers are not limited.
    paris.ListPrograms(eligibility_pb2.ListProgramsRequest())
    lyon = As(h.channel, h.tokens["advisor-lyon"])
    assert lyon.CheckEligibility(check_request()).decisions
    # The refused calls are logged with their code, never with whom they were about.
    with pytest.raises(grpc.RpcError):
        paris.CheckEligibility(check_request())


def test_token_bucket_refills_at_its_rate() -> None:
    t = FakeTime()
    buckets = TokenBuckets(rate_per_min=120, burst=3, clock=t)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # 2 a second
    assert buckets.take("b") == 0.0  # per caller
    t.t = 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    t.t = 100.0  # never more than the burst
    assert [buckets.take("a") for _ in range(4)][-1] > 0


def test_rate_limit_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from entitlement.config import Settings
    for name in ("ENTITLEMENT_CHECK_RATE_PER_MIN", "ENTITLEMENT_CHECK_BURST", "ENTITLEMENT_RETENTION_DAYS",
                 "ENTITLEMENT_INSECURE", "ENTITLEMENT_CALLER_CACHE_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    s = Settings.from_env()
    assert (s.check_rate_per_min, s.check_burst, s.retention_days, s.insecure, s.caller_cache_seconds,
            s.caller_rotation_overlap_minutes) == (120, 20, 1095, False, 10, 60)
    monkeypatch.setenv("ENTITLEMENT_INSECURE", "1")
    monkeypatch.setenv("ENTITLEMENT_CHECK_RATE_PER_MIN", "0")
    s = Settings.from_env()
    assert s.insecure and s.check_rate_per_min == 0
    monkeypatch.setenv("ENTITLEMENT_INSECURE", "maybe")
    with pytest.raises(SystemExit):
        Settings.from_env()


def test_no_new_token_begins_with_a_dash() -> None:
    """One token in 64 began with "-", which the command line takes for an option (`--token -Xy...`:
    "expected one argument"; a CI run's shared server drew one). Over 4,000 draws (a dash first in
    one at least, otherwise, with odds of 1 in 10^27 against), none does, and the rest of the
    alphabet still comes first."""
    drawn = [new_token() for _ in range(4000)]
    assert not [t for t in drawn if t.startswith("-")]
    assert all(len(t) == 43 and TOKEN_RE.match(t) for t in drawn)
    assert len({t[0] for t in drawn}) == 63  # 64 URL-safe characters but the dash


@pytest.mark.parametrize("model", ["threads", "event-loop"])
def test_mtls_calls_given_up_as_their_handler_starts_never_crash_the_server(
        model: str, fresh_url: str, tmp_path: Path, pki: PKI) -> None:
    """Mutual TLS, one unary thread, platforms known by their certificate alone, calling with
    deadlines of a few milliseconds: many calls are given up just as a pool thread takes them. The
    server (server.py, a process of its own) answers throughout and is still up at the end. (On the
    event-loop server the caller's certificate was read from the pool thread on gRPC's call object,
    which grpc.aio frees as soon as the call is over: a segmentation fault of the whole process
    within a second or two of this load.)"""
    from test_server_ops import PYTHON, START_TIMEOUT, prepare
    d = prepare(tmp_path / "srv", fresh_url, with_registry=False)
    d.extra_env.update({"ENTITLEMENT_SERVER_MODEL": model, "ENTITLEMENT_MAX_WORKERS": "1",
                        "ENTITLEMENT_TLS_CERT_FILE": str(pki.dir / "server.crt"),
                        "ENTITLEMENT_TLS_KEY_FILE": str(pki.dir / "server.key"),
                        "ENTITLEMENT_TLS_CLIENT_CA_FILE": str(pki.ca)})
    with d.log_path.open("w", encoding="utf-8") as stderr:
        proc = subprocess.Popen([PYTHON, "server.py"], cwd=ROOT, env=d.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        channels = [pki.channel(d.port, "platform-oc") for _ in range(6)]
        keys = [c.unary_unary("/entitlement.v1.ActivationService/GetSigningKeys") for c in channels]
        try:
            answer = keys[0](b"", timeout=START_TIMEOUT, wait_for_ready=True)  # serving, over mTLS
            assert activation_pb2.GetSigningKeysResponse.FromString(answer).jwks_json
            until = time.monotonic() + 4
            outcomes: dict[str, int] = {}

            def load(call: Any, seed: int) -> None:
                rng = random.Random(seed)
                while time.monotonic() < until and proc.poll() is None:
                    try:
                        call(b"", timeout=rng.uniform(0.0005, 0.004))
                        code = "OK"
                    except grpc.RpcError as err:
                        code = err.code().name
                    outcomes[code] = outcomes.get(code, 0) + 1
            threads = [threading.Thread(target=load, args=(call, i)) for i, call in enumerate(keys)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert proc.poll() is None, f"the server died ({proc.returncode}) under {outcomes}"
            assert outcomes.get("DEADLINE_EXCEEDED", 0) > 0, outcomes  # calls were given up
            answer = keys[0](b"", timeout=10)  # and it still answers
            assert activation_pb2.GetSigningKeysResponse.FromString(answer).jwks_json
        finally:
            for c in channels:
                c.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
