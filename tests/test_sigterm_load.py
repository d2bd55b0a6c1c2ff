"""Graceful stop under load: SIGTERM to `server.py` while clients stream activations.

- A call in flight when the signal comes completes: a registry import whose stream the client
  holds open across the signal (the server has already spooled its first bytes), finished only
  once the server is refusing new calls; and whatever activations happened to be in flight.
- New calls are refused with UNAVAILABLE. grpc core answers CANCELLED instead to calls it had
  accepted but not yet handed to a handler when the server stops (grpc/grpc#41785): they are
  counted, and like every refused call they were never handled (no access-log line), left no
  idempotency record and no activation of their person: safe to retry elsewhere.
- The server exits 0; after a restart on the same database no acknowledged activation is lost
  (tests/load_clients.verify_durable: the doctor, a consistency proof, replays).
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
from sqlalchemy import select

from load_clients import AGENCY, People, Told, activator, checkpoints, registry_extract, verify_durable
from support import date_msg
from test_server_ops import Server, prepare

from entitlement.clock import SystemClock
from entitlement.pseudonym import Pseudonymizer
from entitlement.storage.db import Database
from entitlement.storage.models import Activation, IdempotencyRecord
from entitlement.v1 import registry_pb2, registry_pb2_grpc

ACTIVATORS = 4
GRACE_S = 30  # calls in flight get this long; the import below needs far less
WAIT_S = 120.0  # bound on waiting for the load and the drain to be observed (never a timing assertion)


def _wait(condition: object, what: str, server: Server) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"waited {WAIT_S}s for {what}\n{server.stderr()[-3000:]}"
        time.sleep(0.01)


def test_sigterm_under_load_completes_calls_in_flight_refuses_new_ones_and_loses_nothing(
        fresh_url: str, tmp_path: Path) -> None:
    d = prepare(tmp_path / "srv", fresh_url)
    spool = tmp_path / "srv" / "tmp"  # the server's TMPDIR: where ImportExtract spools the bytes it receives
    spool.mkdir()
    d.extra_env.update({"TMPDIR": str(spool), "ENTITLEMENT_GRACE_SECONDS": str(GRACE_S)})
    server = Server(d)
    told, people, stop = Told(), People(), threading.Event()
    try:
        threads = [threading.Thread(target=activator, args=(server, told, people, stop), kwargs={"persist": True})
                   for _ in range(ACTIVATORS)]
        threads.append(threading.Thread(target=checkpoints, args=(server, told, stop)))
        for t in threads:
            t.start()
        _wait(lambda: told.ok["activate"] >= 10, "activations to flow", server)

        # A call the server is in the middle of: an import whose first bytes it has spooled.
        body = registry_extract(1, 2000)
        first, rest = body[:64 * 1024], body[64 * 1024:]
        finish = threading.Event()
        import_rid = "import-" + uuid.uuid4().hex
        answer: dict[str, object] = {}

        def parts() -> Iterator[registry_pb2.ImportExtractRequest]:
            yield registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader(
                extracted_on=date_msg(SystemClock().today()), source_name="drain.csv",
                sha256=hashlib.sha256(body).hexdigest()))
            yield registry_pb2.ImportExtractRequest(chunk=first)
            finish.wait(WAIT_S)
            for i in range(0, len(rest), 1 << 20):
                yield registry_pb2.ImportExtractRequest(chunk=rest[i:i + (1 << 20)])

        def push() -> None:
            channel = grpc.insecure_channel(d.address)
            try:
                answer["ok"] = registry_pb2_grpc.RegistryServiceStub(channel).ImportExtract(
                    parts(), metadata=server.metadata(AGENCY, import_rid), timeout=WAIT_S + GRACE_S)
            except grpc.RpcError as err:
                answer["error"] = err.code()
            finally:
                channel.close()

        pusher = threading.Thread(target=push)
        pusher.start()
        _wait(lambda: any(p.stat().st_size > 0 for p in spool.glob("entitlement-extract-*/extract.csv")),
              "the server to spool the import's first bytes", server)

        acked_at_signal = told.ok["activate"]
        told.going_away.set()
        server.proc.terminate()  # SIGTERM
        # The server now refuses new calls; only then does the client send the rest of the import.
        _wait(lambda: sum(told.errors_after.values()) > 0, "a new call to be refused", server)
        finish.set()
        pusher.join(timeout=WAIT_S + GRACE_S)
        rc = server.proc.wait(timeout=WAIT_S + GRACE_S)
        stop.set()
        for t in threads:
            t.join(timeout=60)

        assert rc == 0, server.stderr()[-3000:]
        assert "ok" in answer, f"the import in flight at SIGTERM failed: {answer}"
        told.imports.append(int(answer["ok"].snapshot.split("/", 1)[1]))  # type: ignore[attr-defined]
        assert not told.errors_before, dict(told.errors_before)
        refused = {status for (_, status) in told.errors_after}
        assert refused <= {"UNAVAILABLE", "CANCELLED"}, dict(told.errors_after)
        assert told.errors_after[("activate", "UNAVAILABLE")] >= 1

        lines = d.log_lines()
        events = [x.get("event") for x in lines]
        assert events.count("stopping") == 1 and events.count("stopped") == 1
        stopping = events.index("stopping")
        logged = {x["request_id"]: x["code"] for x in lines if x.get("event") == "rpc" and "request_id" in x}
        finished_after = {x["request_id"] for x in lines[stopping:] if x.get("event") == "rpc"}
        assert logged.get(import_rid) == "OK" and import_rid in finished_after  # in flight at SIGTERM, completed
        with told.lock:
            acked = list(told.activated.values())
            failed = list(told.unacknowledged)
        for a in acked:
            assert logged.get(a.request_id) == "OK", a.request_id
        in_flight_completed = sum(1 for a in acked if a.request_id in finished_after)
        cancelled = [a for a in failed if a.failure == "CANCELLED"]
        for a in failed:  # refused before any handler ran
            assert a.request_id not in logged, (a.request_id, a.failure, logged.get(a.request_id))

        # Refused calls left nothing: no stored answer, no activation of their person.
        pseudo = Pseudonymizer.from_file(d.pseudonym_key_file)
        db = Database(fresh_url, pool_size=1)
        try:
            with db.read() as s:
                stored = s.execute(select(IdempotencyRecord.request_id).where(
                    IdempotencyRecord.request_id.in_([a.request_id for a in failed]))).scalars().all()
                people_with_one = s.execute(select(Activation.id).where(
                    Activation.person_key.in_([pseudo.person_key(a.agency_id) for a in failed]))).scalars().all()
        finally:
            db.dispose()
        assert stored == [] and people_with_one == []

        server.close()
        server = Server(d)
        v = verify_durable(server, told, fresh_url, context="after SIGTERM")
        assert v.activations == len(acked) >= acked_at_signal
        print(f"\nSIGTERM under load: {len(acked)} activations acknowledged ({acked_at_signal} before the signal, "
              f"{in_flight_completed} in flight at it and completed, plus the import), all durable; refused: "
              f"{dict(told.errors_after)}; CANCELLED (grpc/grpc#41785): {len(cancelled)}; log {v.checkpoint_size} "
              f"-> {v.head_size} consistent")
    finally:
        stop.set()
        server.close()
