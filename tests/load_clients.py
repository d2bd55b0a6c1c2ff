"""Client threads that load a `server.py` process (tests/test_server_ops.py's Server) and remember
exactly what they were told, so that a test can kill or stop the server at any moment and then
check, after a restart, that every acknowledged request is durable.

`Told` is that memory: the activations, transitions, redemptions and imports whose call returned
OK, the calls that failed (by status, before and after the server was killed or stopped), and the
last signed checkpoint fetched. `verify_durable` checks it against the restarted server (over
gRPC) and against the database (entitlement.doctor, the shared invariant checker).

People: the test registry's pool (P0000001 ... P0003000, tests/support.py), each activated at most
once per database (`People`).
"""

from __future__ import annotations

import collections
import csv
import datetime as dt
import functools
import hashlib
import io
import random
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from support import POOL_SIZE, date_msg, identity, make_registry_file, pool_birth
from test_server_ops import Server

from entitlement import doctor, merkle, note, synthetic
from entitlement.clock import SystemClock
from entitlement.doctor import Acknowledged
from entitlement.storage.db import Database
from entitlement.v1 import (activation_pb2, activation_pb2_grpc, audit_pb2, audit_pb2_grpc, registry_pb2,
                            registry_pb2_grpc)

ADVISOR, PLATFORM, FUNDER, AGENCY = "advisor-paris", "platform-oc", "funder-ft", "agency-feed"
PROGRAM, PLATFORM_NAME = "programs/premium-job-seekers", "platforms/openclassrooms"
CALL_TIMEOUT = 30.0  # SQLite has one writer: calls may queue behind an import's batch
STATE_NAMES = {activation_pb2.ACTIVE: "active", activation_pb2.SUSPENDED: "suspended",
               activation_pb2.REVOKED: "revoked", activation_pb2.EXPIRED: "expired"}
# action -> (states it applies to, state it leaves)
ACTIONS = {"suspend": (("active",), "suspended"), "resume": (("suspended",), "active"),
           "revoke": (("active", "suspended"), "revoked")}


class People:
    """Pool people not yet activated in this database, handed out once each."""

    def __init__(self, first: int = 1, last: int = POOL_SIZE) -> None:
        self._next, self._last = first, last
        self._lock = threading.Lock()

    def take(self) -> tuple[str, dt.date] | None:
        with self._lock:
            if self._next > self._last:
                return None
            i, self._next = self._next, self._next + 1
        return f"P{i:07d}", pool_birth(i)


@dataclass
class Activated:
    request_id: str
    agency_id: str
    birth: dt.date
    activation_id: str = ""
    token: str = ""
    # Lifecycle as the clients know it: the state after the last acknowledged transition, and the
    # state the call in flight when the server died would have left (it may or may not have committed).
    state: str = "active"
    maybe_state: str | None = None
    account_id: str = ""
    maybe_account_id: str = ""
    transitions: list[tuple[str, str]] = field(default_factory=list)  # acknowledged (action, request_id)
    failure: str = ""  # the status of the activation call when it failed

    def request(self) -> activation_pb2.ActivateEntitlementRequest:
        return activation_pb2.ActivateEntitlementRequest(
            request_id=self.request_id, job_seeker=identity(self.agency_id, self.birth), program=PROGRAM,
            platform=PLATFORM_NAME, reason="load")


@dataclass
class Told:
    """What the clients were told, shared by their threads (guard with `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    activated: dict[str, Activated] = field(default_factory=dict)  # activation id -> acknowledged activation
    unacknowledged: list[Activated] = field(default_factory=list)  # activations whose call failed
    imports: list[int] = field(default_factory=list)  # snapshot ids of acknowledged imports
    checkpoint: audit_pb2.GetCheckpointResponse | None = None  # the last one fetched
    ok: collections.Counter[str] = field(default_factory=collections.Counter)  # method -> calls answered OK
    # (method, status) of failed calls, while the server was up and once it was going away
    errors_before: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    errors_after: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    # Set just before the server is killed or signalled: calls failing from then on are expected to.
    going_away: threading.Event = field(default_factory=threading.Event)
    in_flight_imports: int = 0

    def failed(self, method: str, err: grpc.RpcError) -> None:
        with self.lock:
            bucket = self.errors_after if self.going_away.is_set() else self.errors_before
            bucket[(method, err.code().name)] += 1

    def succeeded(self, method: str) -> None:
        with self.lock:
            self.ok[method] += 1

    def acknowledged(self) -> list[Acknowledged]:
        """Everything acknowledged, for entitlement.doctor."""
        with self.lock:
            out = [Acknowledged("import", snapshot_id=sid) for sid in self.imports]
            for a in self.activated.values():
                out.append(Acknowledged("activate", a.activation_id, ADVISOR, a.request_id))
                out += [Acknowledged(action, a.activation_id, ADVISOR, rid) for action, rid in a.transitions]
                if a.account_id:
                    out.append(Acknowledged("redeem", a.activation_id, account_id=a.account_id))
            return out


def _metadata(server: Server, caller: str, rid: str = "") -> tuple[tuple[str, str], ...]:
    return server.metadata(caller, rid or uuid.uuid4().hex)


def activator(server: Server, told: Told, people: People, stop: threading.Event,
              on_ack: Callable[[Activated], None] | None = None, *, persist: bool = False) -> None:
    """Activate pool people one after the other, each with a fresh request_id, until `stop`, the
    pool runs out, or a call fails because the server is going away (`persist`: keep calling,
    a little slower, until `stop`: to see how a stopping server answers)."""
    channel = grpc.insecure_channel(server.dir.address)
    stub = activation_pb2_grpc.ActivationServiceStub(channel)
    try:
        while not stop.is_set():
            person = people.take()
            if person is None:
                return
            a = Activated(uuid.uuid4().hex, *person)
            try:
                resp = stub.ActivateEntitlement(a.request(), metadata=_metadata(server, ADVISOR, a.request_id),
                                                timeout=CALL_TIMEOUT)
            except grpc.RpcError as err:
                told.failed("activate", err)
                a.failure = err.code().name
                with told.lock:
                    told.unacknowledged.append(a)
                if told.going_away.is_set():
                    if not persist:
                        return
                    stop.wait(0.02)
                continue
            a.activation_id, a.token = resp.activation.name.split("/", 1)[1], resp.activation_token
            with told.lock:
                told.activated[a.activation_id] = a
                told.ok["activate"] += 1
            if on_ack is not None:
                on_ack(a)
    finally:
        channel.close()


def lifecycle(server: Server, told: Told, mine: list[Activated], rng: random.Random, stop: threading.Event) -> None:
    """Suspend, resume, revoke (each with a request_id) and redeem the activations appended to
    `mine`, one call at a time, so each activation's history has one order. Stops at the first
    failed call: that call's outcome is unknown (it may have committed before the server died)."""
    channel = grpc.insecure_channel(server.dir.address)
    stub = activation_pb2_grpc.ActivationServiceStub(channel)
    calls = {"suspend": stub.SuspendActivation, "resume": stub.ResumeActivation, "revoke": stub.RevokeActivation}
    try:
        while not stop.is_set():
            with told.lock:
                live = [a for a in mine if a.state != "revoked"]
            if not live:
                stop.wait(0.01)
                continue
            a = rng.choice(live)
            choices = [x for x, (from_states, _) in ACTIONS.items() if a.state in from_states]
            if not a.account_id:
                choices += ["redeem", "redeem"]
            action = rng.choice(choices)
            if action == "redeem":
                account = f"learner-{a.activation_id[:16]}"
                try:
                    stub.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
                        token=a.token, account_id=account), metadata=_metadata(server, PLATFORM), timeout=CALL_TIMEOUT)
                except grpc.RpcError as err:
                    told.failed("redeem", err)
                    with told.lock:
                        a.maybe_account_id = account
                    return
                with told.lock:
                    a.account_id = account
                    told.ok["redeem"] += 1
                continue
            rid = uuid.uuid4().hex
            try:
                calls[action](activation_pb2.TransitionActivationRequest(
                    name=f"activations/{a.activation_id}", reason=f"load {action}", request_id=rid),
                    metadata=_metadata(server, ADVISOR, rid), timeout=CALL_TIMEOUT)
            except grpc.RpcError as err:
                told.failed(action, err)
                with told.lock:
                    a.maybe_state = ACTIONS[action][1]
                return
            with told.lock:
                a.state = ACTIONS[action][1]
                a.transitions.append((action, rid))
                told.ok[action] += 1
    finally:
        channel.close()


@functools.lru_cache(maxsize=4)
def _extract_body(filler_rows: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        text = make_registry_file(Path(tmp) / "registry.csv").read_text(encoding="utf-8")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=synthetic.COLUMNS, lineterminator="\n")
    writer.writerows(synthetic.rows(filler_rows, seed=7))
    return text + buf.getvalue()


def registry_extract(import_no: int, filler_rows: int) -> bytes:
    """The test registry (the pool stays eligible) plus `filler_rows` synthetic people, and one row
    of its own so that every import's bytes differ (the same bytes again would change nothing)."""
    return (_extract_body(filler_rows) + f"X{import_no:07d},,Import,Row,1990-01-01,75011,2024-01-15,,1\n").encode()


def importer(server: Server, told: Told, filler_rows: int, stop: threading.Event, first_import: int) -> None:
    """Push registry extracts (RegistryService.ImportExtract) one after the other until `stop`."""
    channel = grpc.insecure_channel(server.dir.address)
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    n = first_import
    try:
        while not stop.is_set():
            body = registry_extract(n, filler_rows)
            n += 1

            def parts(data: bytes = body) -> Any:
                yield registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader(
                    extracted_on=date_msg(SystemClock().today()), source_name=f"load-{n}.csv",
                    sha256=hashlib.sha256(data).hexdigest(),
                    min_ratio=1e-9))  # sizes vary on purpose: a smaller extract is not a cut-off one here
                for i in range(0, len(data), 1 << 20):
                    yield registry_pb2.ImportExtractRequest(chunk=data[i:i + (1 << 20)])

            with told.lock:
                told.in_flight_imports += 1
            try:
                resp = stub.ImportExtract(parts(), metadata=_metadata(server, AGENCY), timeout=120)
            except grpc.RpcError as err:
                told.failed("import", err)
                return
            finally:
                with told.lock:
                    told.in_flight_imports -= 1
            with told.lock:
                told.imports.append(int(resp.snapshot.split("/", 1)[1]))
                told.ok["import"] += 1
    finally:
        channel.close()


def checkpoints(server: Server, told: Told, stop: threading.Event, every_s: float = 0.05) -> None:
    """Fetch the signed checkpoint again and again; keep the last one."""
    channel = grpc.insecure_channel(server.dir.address)
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    try:
        while not stop.wait(every_s):
            try:
                resp = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=_metadata(server, FUNDER),
                                          timeout=CALL_TIMEOUT)
            except grpc.RpcError as err:
                told.failed("checkpoint", err)
                if told.going_away.is_set():
                    return
                continue
            with told.lock:
                if told.checkpoint is None or resp.tree_size >= told.checkpoint.tree_size:
                    told.checkpoint = resp
                told.ok["checkpoint"] += 1
    finally:
        channel.close()


@dataclass
class Verified:
    activations: int
    transitions: int
    redemptions: int
    imports: int
    resolved: int  # calls whose outcome was unknown at the kill, now settled by what the server holds
    checkpoint_size: int
    head_size: int


def verify_durable(server: Server, told: Told, database_url: str, *, context: str) -> Verified:
    """After a restart: the database keeps every invariant and holds every acknowledged request
    (entitlement.doctor), the log extends the last checkpoint fetched before (a consistency proof
    from the restarted server), every acknowledged activation is there with its acknowledged state
    (or the state of the call in flight when the server died) and binding, and replaying each
    acknowledged request_id answers the same activation. Then the unknown outcomes are settled to
    what the server holds, for the next round."""
    channel = server.channel
    activation = activation_pb2_grpc.ActivationServiceStub(channel)
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    trusted_msg = told.checkpoint
    trusted = None
    if trusted_msg is not None:  # its signature, with the key the restarted server publishes
        key = note.Verifier.parse(audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(),
                                                      metadata=_metadata(server, FUNDER), timeout=CALL_TIMEOUT).verifier_key)
        trusted = note.open_checkpoint(trusted_msg.checkpoint, key)

    db = Database(database_url, pool_size=1)
    try:
        problems = doctor.check(db, trusted=trusted, acknowledged=told.acknowledged())
    finally:
        db.dispose()
    assert problems == [], f"{context}: {problems[:10]}"

    head = audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=_metadata(server, FUNDER),
                               timeout=CALL_TIMEOUT)
    new = note.open_checkpoint(head.checkpoint, note.Verifier.parse(head.verifier_key))
    if trusted is not None:
        proof = audit.GetConsistencyProof(audit_pb2.GetConsistencyProofRequest(
            old_size=trusted.size, new_size=new.size), metadata=_metadata(server, FUNDER), timeout=CALL_TIMEOUT)
        merkle.verify_consistency(trusted.size, new.size, list(proof.hashes), trusted.root_hash, new.root_hash)

    transitions = redemptions = resolved = 0
    with told.lock:
        acked = list(told.activated.values())
    for a in acked:
        got = activation.GetActivation(activation_pb2.GetActivationRequest(name=f"activations/{a.activation_id}"),
                                       metadata=_metadata(server, ADVISOR), timeout=CALL_TIMEOUT)
        state = STATE_NAMES[got.state]
        allowed = {a.state} | ({a.maybe_state} if a.maybe_state else set())
        assert state in allowed, f"{context}: activations/{a.activation_id} is {state}, clients were told {a.state}" \
                                 f" (then {a.maybe_state or 'nothing'} was in flight)"
        bound = {a.account_id} if a.account_id else {"", a.maybe_account_id}
        assert got.account_id in bound, f"{context}: activations/{a.activation_id} bound to {got.account_id!r}"
        replay = activation.ActivateEntitlement(a.request(), metadata=_metadata(server, ADVISOR), timeout=CALL_TIMEOUT)
        assert (replay.activation.name, replay.activation_token) == (f"activations/{a.activation_id}", a.token), \
            f"{context}: replaying request {a.request_id} answered {replay.activation.name}"
        for action, rid in a.transitions:
            again = getattr(activation, f"{action.title()}Activation")(activation_pb2.TransitionActivationRequest(
                name=f"activations/{a.activation_id}", reason=f"load {action}", request_id=rid),
                metadata=_metadata(server, ADVISOR), timeout=CALL_TIMEOUT)
            assert again.name == f"activations/{a.activation_id}", f"{context}: replaying {action} {rid}"
            transitions += 1
        redemptions += bool(a.account_id)
        with told.lock:  # what the server holds is what the next round builds on
            resolved += bool(a.maybe_state) + bool(a.maybe_account_id)
            a.state, a.maybe_state = state, None
            if a.maybe_account_id:
                a.account_id, a.maybe_account_id = got.account_id, ""
    with told.lock:
        resolved += len(told.unacknowledged)
        told.unacknowledged.clear()  # their people are spent either way (People never hands them out again)
        imports = len(told.imports)
    return Verified(len(acked), transitions, redemptions, imports, resolved, trusted.size if trusted else 0, new.size)
