"""Concurrency across server processes (step 4): two `server.py` processes on one database, on
SQLite and on PostgreSQL, with clients spread over both.

- 200 concurrent activations of one person: one activation, one set of ledger entries, one event;
  every other call is ALREADY_EXISTS naming the winner.
- Programs with room for exactly 100 (a seat cap, a budget cap) and 500 concurrent activations of
  500 people: exactly 100 succeed, the others are refused with CAP_REACHED and leave nothing behind;
  the program counter, the ledger and the cap agree, and the counter is never seen above the cap.
- One request_id sent 20 times at once: one activation, the same answer every time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from conftest import create_pg_database, drop_pg_database
from support import As, Failure, failure, identity, pool_birth
from test_server_ops import Server, ServerDir, free_port, prepare

from entitlement.config import ROOT
from entitlement.pseudonym import Pseudonymizer
from entitlement.storage.db import Database
from entitlement.storage.models import (Activation, Event, IdempotencyRecord, LedgerEntry, LogHead,
                                        ProgramCounter)
from entitlement.v1 import activation_pb2

CLIENT_THREADS = 32
SERVER_WORKERS = 32  # per process; two processes stay well under PostgreSQL's 100 connections
DEADLINE_S = 60.0  # SQLite serializes writers: calls queue behind the write lock
ADVISOR = "advisor-paris"

PREMIUM = "premium-job-seekers"
PREMIUM_COST = 2000 * 12  # price per month x months (pool people have no registration end)

SEATS_PROGRAM = "capped-seats-test"
SEATS_COST = 2000 * 12
BUDGET_PROGRAM = "capped-budget-test"
BUDGET_COST = 1500 * 4
ROOM = 100  # activations each capped program has room for

CAPPED_PROGRAMS = {
    SEATS_PROGRAM: f"""
id: {SEATS_PROGRAM}
title: Capped by seats (test)
tier: premium
period: {{start: 2015-09-01, end: null}}
criteria: [registered, category_covered, registration_active, registry_data_fresh, seats_available]
parameters:
  max_seats: {{values: {{2015-09-01: {{value: {ROOM}, reference: "Test: room for exactly {ROOM}"}}}}}}
  max_registry_age_days: {{values: {{2015-09-01: {{value: 45, reference: "As premium-job-seekers"}}}}}}
  months_after_registration_end: {{values: {{2015-09-01: {{value: 1, reference: "As premium-job-seekers"}}}}}}
  categories: {{values: {{2015-09-01: {{value: [1, 2, 3, 4, 5], reference: "As premium-job-seekers"}}}}}}
  price_per_month_cents: {{values: {{2015-09-01: {{value: 2000, reference: "As premium-job-seekers"}}}}}}
  activation_months: {{values: {{2015-09-01: {{value: 12, reference: "As premium-job-seekers"}}}}}}
  funders: {{values: {{2015-09-01: {{value: {{ministry-of-labour: 5000, france-travail: 5000}}, reference: "50/50"}}}}}}
""",
    BUDGET_PROGRAM: f"""
id: {BUDGET_PROGRAM}
title: Capped by budget (test)
tier: premium
period: {{start: 2015-09-01, end: null}}
criteria: [registered, category_covered, registration_active, registry_data_fresh, budget_available]
parameters:
  max_budget_cents:
    values: {{2015-09-01: {{value: {ROOM * BUDGET_COST}, reference: "Test: room for exactly {ROOM} activations"}}}}
  max_registry_age_days: {{values: {{2015-09-01: {{value: 45, reference: "As premium-job-seekers"}}}}}}
  months_after_registration_end: {{values: {{2015-09-01: {{value: 1, reference: "As premium-job-seekers"}}}}}}
  categories: {{values: {{2015-09-01: {{value: [1, 2, 3, 4, 5], reference: "As premium-job-seekers"}}}}}}
  price_per_month_cents: {{values: {{2015-09-01: {{value: 1500, reference: "Test price"}}}}}}
  activation_months: {{values: {{2015-09-01: {{value: 4, reference: "Test length"}}}}}}
  funders:
    values: {{2015-09-01: {{value: {{ministry-of-labour: 3333, france-travail: 3333, region-idf: 3334}},
                           reference: "Three-way split (largest remainder)"}}}}
""",
}
CAPS = {SEATS_PROGRAM: ("seats", ROOM, SEATS_COST), BUDGET_PROGRAM: ("budget", ROOM * BUDGET_COST, BUDGET_COST)}

# Pool people per test: each backend has its own database and registry, so the numbers are ours.
ONE_PERSON = 1
RETRIED_PEOPLE = range(2, 7)  # one burst of 20 per person: a race missed once is caught in another round
CAPPED_PEOPLE = {SEATS_PROGRAM: range(101, 601), BUDGET_PROGRAM: range(601, 1101)}


@dataclass
class Cluster:
    backend: str
    url: str
    servers: list[Server]
    stubs: list[As]
    db: Database
    pseudo: Pseudonymizer
    timings: dict[str, float]

    def activate(self, i: int, person: int, request_id: str, program: str = PREMIUM) -> Any:
        """ActivateEntitlement on server i % 2; the response, or the decoded Failure."""
        request = activation_pb2.ActivateEntitlementRequest(
            request_id=request_id, job_seeker=identity(f"P{person:07d}", pool_birth(person)),
            program=f"programs/{program}", platform="platforms/openclassrooms", reason="concurrency test")
        try:
            return self.stubs[i % 2].ActivateEntitlement(request, timeout=DEADLINE_S)
        except grpc.RpcError as err:
            return failure(err)

    def person_key(self, person: int) -> bytes:
        return self.pseudo.person_key(f"P{person:07d}")

    def rpc_lines(self) -> list[list[dict[str, Any]]]:
        return [[x for x in s.dir.log_lines() if x.get("event") == "rpc"] for s in self.servers]


def _second_dir(first: ServerDir, root: Path) -> ServerDir:
    """Another server on the same database, secrets and callers: its own folder (for its log) and port."""
    root.mkdir(parents=True)
    shutil.copy2(first.root / "callers.json", root / "callers.json")
    shutil.copytree(first.root / "keys", root / "keys")
    shutil.copytree(first.root / "secrets", root / "secrets")
    return dataclasses.replace(first, root=root, port=free_port(), extra_env=dict(first.extra_env))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"concurrency-{backend}")
    pg_name = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp / 'entitlement.db'}"
    else:
        admin = request.getfixturevalue("pg_server")
        pg_name, url = create_pg_database(admin)
    programs = tmp / "programs"
    shutil.copytree(ROOT / "programs", programs, ignore=shutil.ignore_patterns("*.md"))
    for program_id, text in CAPPED_PROGRAMS.items():
        (programs / f"{program_id}.yaml").write_text(text, encoding="utf-8")
    servers: list[Server] = []
    timings: dict[str, float] = {}
    db = None
    try:
        first = prepare(tmp / "srv-a", url)
        first.programs_dir = programs
        first.extra_env["ENTITLEMENT_MAX_WORKERS"] = str(SERVER_WORKERS)
        dirs = [first, _second_dir(first, tmp / "srv-b")]
        for d in dirs:
            servers.append(Server(d))
        db = Database(url, pool_size=2)
        yield Cluster(backend=backend, url=url, servers=servers,
                      stubs=[As(s.channel, d.tokens[ADVISOR]) for s, d in zip(servers, dirs)], db=db,
                      pseudo=Pseudonymizer.from_file(first.pseudonym_key_file), timings=timings)
    finally:
        if timings:  # shown on the terminal, not captured: the wall time of each burst
            capture = request.config.pluginmanager.get_plugin("capturemanager")
            with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                print(f"\n[{backend}] wall time: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        for s in servers:
            s.close()
        if db is not None:
            db.dispose()
        if pg_name is not None:
            drop_pg_database(request.getfixturevalue("pg_server"), pg_name)


def _run(n: int, fn: Callable[[int], Any]) -> tuple[list[Any], float]:
    """fn(0..n-1) on CLIENT_THREADS threads, all released together; (results in order, seconds)."""
    start = threading.Event()

    def one(i: int) -> Any:
        start.wait()
        return fn(i)

    with ThreadPoolExecutor(max_workers=min(n, CLIENT_THREADS)) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        t0 = time.perf_counter()
        start.set()
        results = [f.result() for f in futures]
        return results, time.perf_counter() - t0


def _shape(r: Any) -> tuple[str, str]:
    return ("OK", "") if not isinstance(r, Failure) else (r.code.name, r.reason)


def _describe(results: list[Any]) -> str:
    """The shapes seen and a few unexpected failures, for assertion messages."""
    shapes = collections.Counter(_shape(r) for r in results)
    odd = [f"{r.code.name} {r.reason}: {r.message} {r.metadata}" for r in results
           if isinstance(r, Failure) and r.reason not in ("ACTIVATION_EXISTS", "CAP_REACHED", "NOT_ELIGIBLE")]
    return f"shapes {dict(shapes)}; unexpected: {odd[:5]}"


# Warnings a server logs at start about its machine, not about this run: this host's loopback TCP
# (entitlement/hostcheck.py), and registry-extract spools that killed servers of earlier tests left
# in the temp directory (swept at start: server.py).
STARTUP_WARNINGS = frozenset({"loopback_tcp_stalls", "stale_extract_spools_removed"})


def _assert_servers_healthy(c: Cluster) -> None:
    """No unhandled exception, outage or deadline on either server, and both served calls."""
    for s, lines in zip(c.servers, c.rpc_lines()):
        codes = collections.Counter(x["code"] for x in lines)
        assert lines, f"server {s.dir.address} served no call"
        assert not {"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"} & set(codes), (codes, s.stderr()[-4000:])
        errors = [x for x in s.dir.log_lines() if x.get("level") in ("error", "warning")
                  and x.get("event") not in STARTUP_WARNINGS]
        assert errors == [], errors[:3]
        assert s.proc.poll() is None


def _assert_event_log_gapless(c: Cluster) -> None:
    with c.db.read() as s:
        size = s.execute(select(LogHead.size).where(LogHead.id == 1)).scalar_one()
        seqs = list(s.execute(select(Event.seq).order_by(Event.seq)).scalars())
    assert seqs == list(range(1, size + 1))


def _rid(tag: str, i: int | None = None) -> str:
    return f"{tag}-{i}-{uuid.uuid4().hex[:12]}" if i is not None else f"{tag}-{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------------- one person

def test_200_concurrent_activations_of_one_person_make_one(cluster: Cluster) -> None:
    c, person, n = cluster, ONE_PERSON, 200
    rids = [_rid("one", i) for i in range(n)]
    results, took = _run(n, lambda i: c.activate(i, person, rids[i]))
    c.timings["one person x200"] = took

    wins = [(i, r) for i, r in enumerate(results) if not isinstance(r, Failure)]
    assert len(wins) == 1, _describe(results)
    [(win_i, win)] = wins
    winner = win.activation.name
    winner_id = winner.split("/")[1]
    for r in results:
        if isinstance(r, Failure):
            assert (r.code, r.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ACTIVATION_EXISTS"), _describe(results)
            assert r.metadata["activation"] == winner

    key = c.person_key(person)
    with c.db.read() as s:
        rows = s.execute(select(Activation).where(Activation.person_key == key)).scalars().all()
        assert [(a.id, a.state, a.program_id) for a in rows] == [(winner_id, "active", PREMIUM)]
        ledger = s.execute(select(LedgerEntry.activation_id, LedgerEntry.kind, LedgerEntry.funder_id,
                                  LedgerEntry.amount_cents).where(LedgerEntry.program_id == PREMIUM)).all()
        assert sorted(e[1:] for e in ledger if e.activation_id == winner_id and e.kind == "commit") == [
            ("commit", "france-travail", PREMIUM_COST // 2), ("commit", "ministry-of-labour", PREMIUM_COST // 2)]
        ref = c.pseudo.person_ref(key)
        created = [e for e in s.execute(select(Event).where(Event.type == "activation.created")).scalars()
                   if json.loads(e.payload_json)["job_seeker_ref"] == ref]
        assert [e.subject for e in created] == [winner]
        assert s.execute(select(func.count()).select_from(Event).where(
            Event.subject == winner, Event.type == "activation.created")).scalar_one() == 1
        records = s.execute(select(IdempotencyRecord.request_id).where(
            IdempotencyRecord.request_id.in_(rids))).scalars().all()
        assert records == [rids[win_i]]  # the refused calls stored no response
    _assert_event_log_gapless(c)
    _assert_servers_healthy(c)


# ----------------------------------------------------------------------------------- caps

class CounterWatch:
    """Reads the program's counter row over and over while the activations run: the highest values
    any reader ever saw."""

    def __init__(self, db: Database, program_id: str) -> None:
        self.db, self.program_id = db, program_id
        self.max_seats = self.max_cents = self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            with self.db.read() as s:
                row = s.execute(select(ProgramCounter.seats_used, ProgramCounter.cents_committed).where(
                    ProgramCounter.program_id == self.program_id)).one_or_none()
            if row is not None:
                self.max_seats, self.max_cents = max(self.max_seats, row[0]), max(self.max_cents, row[1])
            self.reads += 1
            self._stop.wait(0.01)

    def __enter__(self) -> "CounterWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.mark.parametrize("program_id", [SEATS_PROGRAM, BUDGET_PROGRAM], ids=["seats", "budget"])
def test_500_people_compete_for_room_for_100(cluster: Cluster, program_id: str) -> None:
    c = cluster
    kind, cap, cost = CAPS[program_id]
    people = list(CAPPED_PEOPLE[program_id])
    n = len(people)
    rids = [_rid("cap", i) for i in range(n)]
    with CounterWatch(c.db, program_id) as watch:
        results, took = _run(n, lambda i: c.activate(i, people[i], rids[i], program_id))
    c.timings[f"{kind} cap x{n}"] = took

    wins = {rids[i]: r for i, r in enumerate(results) if not isinstance(r, Failure)}
    refused = [r for r in results if isinstance(r, Failure)]
    assert len(wins) == ROOM, _describe(results)
    shapes = collections.Counter(_shape(r) for r in refused)
    assert set(shapes) <= {("RESOURCE_EXHAUSTED", "CAP_REACHED"), ("FAILED_PRECONDITION", "NOT_ELIGIBLE")}, \
        _describe(results)
    for f in refused:
        if f.code == grpc.StatusCode.FAILED_PRECONDITION:
            assert f.metadata["failed_criteria"] == "CAP_REACHED", f
        assert f.metadata["program"]
    assert sum(shapes.values()) == n - ROOM
    won_ids = {r.activation.name.split("/")[1] for r in wins.values()}
    assert len(won_ids) == ROOM
    assert all(r.activation.program == f"programs/{program_id}" for r in wins.values())

    # Never above the cap, even while the activations ran.
    assert watch.reads > 0
    if kind == "seats":
        assert watch.max_seats <= cap
    else:
        assert watch.max_cents <= cap

    with c.db.read() as s:
        counter = s.execute(select(ProgramCounter).where(ProgramCounter.program_id == program_id)).scalar_one()
        assert (counter.seats_used, counter.cents_committed) == (ROOM, ROOM * cost)
        assert (counter.seats_used if kind == "seats" else counter.cents_committed) == cap

        activations = s.execute(select(Activation).where(Activation.program_id == program_id)).scalars().all()
        assert {a.id for a in activations} == won_ids
        assert all(a.state == "active" for a in activations)
        assert {a.person_key for a in activations} <= {c.person_key(p) for p in people}
        assert len({a.person_key for a in activations}) == ROOM

        ledger = s.execute(select(LedgerEntry).where(LedgerEntry.program_id == program_id)).scalars().all()
        assert {e.activation_id for e in ledger} == won_ids  # nothing for the refused requests
        assert not [e for e in ledger if e.kind == "release"]
        commits = [e for e in ledger if e.kind == "commit"]
        assert sum(e.amount_cents for e in commits) == counter.cents_committed == ROOM * cost
        per_activation: dict[str, list[int]] = collections.defaultdict(list)
        for e in commits:
            per_activation[e.activation_id].append(e.amount_cents)
        # Every activation has its commit entries, one per funder, adding up to its cost.
        funders = 2 if kind == "seats" else 3
        assert {a: (len(v), sum(v)) for a, v in per_activation.items()} == {a: (funders, cost) for a in won_ids}

        events = s.execute(select(Event).where(Event.program_id == program_id)).scalars().all()
        assert {e.subject for e in events} == {f"activations/{a}" for a in won_ids}
        assert sorted(e.subject for e in events if e.type == "activation.created") == sorted(
            f"activations/{a}" for a in won_ids)

        records = {r.request_id: json.loads(r.response) for r in s.execute(
            select(IdempotencyRecord).where(IdempotencyRecord.request_id.in_(rids))).scalars()}
        # The winners' responses are stored, the refused requests left no record.
        assert set(records) == set(wins)
        assert {rid: rec["activation_id"] for rid, rec in records.items()} == {
            rid: r.activation.name.split("/")[1] for rid, r in wins.items()}
    _assert_event_log_gapless(c)
    _assert_servers_healthy(c)


# ----------------------------------------------------------------------------------- one request id

@pytest.mark.parametrize("person", RETRIED_PEOPLE, ids=lambda p: f"round{p - RETRIED_PEOPLE[0] + 1}")
def test_one_request_id_sent_20_times_at_once_makes_one_activation(cluster: Cluster, person: int) -> None:
    c, n = cluster, 20
    request_id = _rid("retried")
    results, took = _run(n, lambda i: c.activate(i, person, request_id))
    c.timings["same request_id x20"] = c.timings.get("same request_id x20", 0.0) + took

    answers = [r for r in results if not isinstance(r, Failure)]
    refused = [r for r in results if isinstance(r, Failure)]
    # A retry arriving while another is in flight (in either server process) is ABORTED with
    # REQUEST_IN_FLIGHT (entitlement/inflight.py): the only other answer allowed.
    assert all((f.code, f.reason) == (grpc.StatusCode.ABORTED, "REQUEST_IN_FLIGHT") for f in refused), \
        _describe(results)
    assert answers, _describe(results)
    assert len({r.activation.name for r in answers}) == 1
    assert len({r.activation_token for r in answers}) == 1
    assert len({r.SerializeToString(deterministic=True) for r in answers}) == 1  # the very same answer
    name = answers[0].activation.name

    with c.db.read() as s:
        rows = s.execute(select(Activation.id).where(Activation.person_key == c.person_key(person))).scalars().all()
        assert ["activations/" + a for a in rows] == [name]
        ledger = s.execute(select(func.count(), func.sum(LedgerEntry.amount_cents)).where(
            LedgerEntry.activation_id == name.split("/")[1], LedgerEntry.kind == "commit")).one()
        assert tuple(ledger) == (2, PREMIUM_COST)
        assert s.execute(select(Event.type).where(Event.subject == name)).scalars().all().count(
            "activation.created") == 1
        [record] = s.execute(select(IdempotencyRecord).where(IdempotencyRecord.request_id == request_id)).scalars()
        stored = json.loads(record.response)
        assert (stored["activation_id"], stored["token"]) == (name.split("/")[1], answers[0].activation_token)
        assert stored["answered"]["state"] == "active"  # what a later replay answers (AIP-155)
    _assert_event_log_gapless(c)
    _assert_servers_healthy(c)
