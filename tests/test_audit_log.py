"""The Merkle event log through the real server, on SQLite and PostgreSQL: signed checkpoints,
inclusion and consistency proofs, the filtered stream of leaves, `entitlement audit export` and
`entitlement audit verify`; and tampering with the record directly in the database (in a server of
the test's own, its append-only guard lifted), which the verifier catches, naming the first bad
sequence number.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from own_server import next_ledger_person, own_server
from support import Api, As, Harness, expect_error, identity

from entitlement import cli, eventlog, logformat, logtree, merkle, note
from entitlement.logformat import LogEvent
from entitlement.server_main import start
from entitlement.storage.db import Database
from entitlement.storage.migrate import alembic_config, upgrade
from entitlement.storage.models import Event, LogNode
from entitlement.v1 import activation_pb2, audit_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MINISTRY = "funder-ministry"  # funds premium-job-seekers
IDF = "funder-idf"  # funds opencfa-apprentices (and deuxieme-chance-numerique)


# ------------------------------------------------------------------------------------------ helpers

def checkpoint_of(api: Api, caller: str = MINISTRY) -> tuple[audit_pb2.GetCheckpointResponse, note.Checkpoint]:
    resp = api.as_(caller).GetCheckpoint(audit_pb2.GetCheckpointRequest())
    return resp, note.open_checkpoint(resp.checkpoint, note.Verifier.parse(resp.verifier_key))


def stream(api: Api, caller: str, start: int = 0, size: int = 0) -> list[audit_pb2.LogEntry]:
    return list(api.as_(caller).StreamEvents(audit_pb2.StreamEventsRequest(start_sequence=start, tree_size=size)))


def log_event(e: audit_pb2.Event) -> LogEvent:
    return LogEvent(e.sequence, e.time.seconds * 1_000_000 + e.time.nanos // 1000, e.type, e.actor, e.subject,
                    e.program.removeprefix("programs/"), e.reason, e.payload_json)


def activate(api: Api, program: str = "premium-job-seekers") -> str:
    agency_id, birth = next_ledger_person()
    resp = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=f"programs/{program}", platform="platforms/openclassrooms", reason="audit log test",
        mentor_id="mentor-1" if program == "opencfa-apprentices" else ""))
    return str(resp.activation.name)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def export(capsys: pytest.CaptureFixture[str], h: Harness, caller: str, out: Path,
           trusted: Path | None = None) -> Path:
    argv = ["audit", "export", str(out), "--address", f"127.0.0.1:{h.running.port}", f"--token={h.tokens[caller]}"]
    if trusted is not None:
        argv += ["--trusted", str(trusted)]
    code, output = run_cli(capsys, *argv)
    assert code == 0, output
    return out


def verify(capsys: pytest.CaptureFixture[str], bundle: Path, vkey: str, trusted: Path | None = None,
           previous: Path | None = None) -> tuple[int, str]:
    argv = ["audit", "verify", str(bundle / "events.jsonl"), "--checkpoint", str(bundle / "checkpoint.txt"),
            "--key", vkey]
    if trusted is not None:
        argv += ["--trusted", str(trusted)]
        if (bundle / "consistency.json").exists():
            argv += ["--proof", str(bundle / "consistency.json")]
    if previous is not None:
        argv += ["--previous-events", str(previous)]
    return run_cli(capsys, *argv)


# ------------------------------------------------------------------------------------------ shared server

def test_checkpoint_is_signed_by_the_log_key_and_commits_to_every_event(api: Api) -> None:
    api.activate()
    resp, cp = checkpoint_of(api)
    signer = api.h.ctx.log_signer
    assert signer is not None
    assert resp.verifier_key == signer.verifier.encode()
    assert resp.origin == cp.origin == "entitlement.local/audit-log"
    assert (resp.tree_size, resp.root_hash) == (cp.size, cp.root_hash)
    # The log key is its own, not a token signing key.
    token_keys = {sk.private.public_key().public_bytes_raw() for sk in api.h.ctx.keys.published(api.h.clock.now())}
    assert token_keys and signer.private_key.public_key().public_bytes_raw() not in token_keys
    # Recomputed from the events themselves (an admin reads them all).
    entries = stream(api, "admin", size=cp.size)
    assert [e.sequence for e in entries] == list(range(1, cp.size + 1))
    leaves = [log_event(e.event).leaf_hash() for e in entries]
    assert leaves == [e.leaf_hash for e in entries]
    assert merkle.root(leaves) == cp.root_hash
    # Same size, same signed text (Ed25519 is deterministic); a forged size does not verify.
    assert checkpoint_of(api, "admin")[0].checkpoint == resp.checkpoint
    forged = resp.checkpoint.replace(f"\n{cp.size}\n", f"\n{cp.size + 1}\n", 1)
    with pytest.raises(note.NoteError):
        note.open_checkpoint(forged, note.Verifier.parse(resp.verifier_key))


def test_inclusion_proofs_verify_against_the_checkpoint(api: Api) -> None:
    api.activate()
    _, cp = checkpoint_of(api)
    funder = api.as_(MINISTRY)
    for seq in sorted({1, 2, cp.size // 2, cp.size - 1, cp.size}):
        by_seq = funder.GetInclusionProof(audit_pb2.GetInclusionProofRequest(sequence=seq, tree_size=cp.size))
        by_index = funder.GetInclusionProof(audit_pb2.GetInclusionProofRequest(leaf_index=seq - 1,
                                                                                 tree_size=cp.size))
        assert by_seq == by_index and by_seq.leaf_index == seq - 1 and by_seq.tree_size == cp.size
        merkle.verify_inclusion(seq - 1, cp.size, by_seq.leaf_hash, list(by_seq.hashes), cp.root_hash)
    latest = funder.GetInclusionProof(audit_pb2.GetInclusionProofRequest(leaf_index=0))
    assert latest.tree_size == cp.size  # 0 = the current size


def test_consistency_between_checkpoints_before_and_after_more_activations(api: Api) -> None:
    _, before = checkpoint_of(api)
    for _ in range(3):
        api.activate()
    _, after = checkpoint_of(api)
    assert after.size >= before.size + 3
    proof = api.as_(MINISTRY).GetConsistencyProof(
        audit_pb2.GetConsistencyProofRequest(old_size=before.size, new_size=after.size))
    assert (proof.old_size, proof.new_size) == (before.size, after.size)
    merkle.verify_consistency(before.size, after.size, list(proof.hashes), before.root_hash, after.root_hash)
    with pytest.raises(merkle.ProofError):  # not a proof for another old size
        merkle.verify_consistency(before.size - 1, after.size, list(proof.hashes), before.root_hash, after.root_hash)
    empty = api.as_(MINISTRY).GetConsistencyProof(audit_pb2.GetConsistencyProofRequest(old_size=after.size))
    assert empty.new_size == after.size and list(empty.hashes) == []


def test_sizes_out_of_range_are_invalid_argument_naming_the_field(api: Api) -> None:
    _, cp = checkpoint_of(api)
    n = cp.size
    funder = api.as_(MINISTRY)
    cases = [
        (funder.GetInclusionProof, audit_pb2.GetInclusionProofRequest(leaf_index=0, tree_size=n + 1), "tree_size"),
        (funder.GetInclusionProof, audit_pb2.GetInclusionProofRequest(leaf_index=n, tree_size=n), "leaf_index"),
        (funder.GetInclusionProof, audit_pb2.GetInclusionProofRequest(sequence=n + 1, tree_size=n), "sequence"),
        (funder.GetInclusionProof, audit_pb2.GetInclusionProofRequest(sequence=0), "sequence"),
        (funder.GetInclusionProof, audit_pb2.GetInclusionProofRequest(leaf_index=-1), "leaf_index"),
        (funder.GetInclusionProof, audit_pb2.GetInclusionProofRequest(tree_size=n), "leaf_index"),
        (funder.GetConsistencyProof, audit_pb2.GetConsistencyProofRequest(old_size=n, new_size=n - 1), "old_size"),
        (funder.GetConsistencyProof, audit_pb2.GetConsistencyProofRequest(old_size=1, new_size=n + 1), "new_size"),
        (funder.GetConsistencyProof, audit_pb2.GetConsistencyProofRequest(old_size=-1), "old_size"),
    ]
    for method, request, field in cases:
        f = expect_error(method, request, INVALID)
        assert set(f.fields) == {field}, (request, f)
    for request, field in ((audit_pb2.StreamEventsRequest(tree_size=n + 1), "tree_size"),
                           (audit_pb2.StreamEventsRequest(start_sequence=n + 2, tree_size=n), "start_sequence")):
        f = expect_error(lambda r: list(funder.StreamEvents(r)), request, INVALID)
        assert set(f.fields) == {field}
    assert stream(api, MINISTRY, start=n + 1, size=n) == []  # nothing after the last one


def test_a_funder_streams_its_own_events_in_full_and_only_leaf_hashes_of_the_others(api: Api) -> None:
    api.activate()
    _, cp = checkpoint_of(api)
    admin = stream(api, "admin", size=cp.size)
    ministry = stream(api, MINISTRY, size=cp.size)
    assert [e.sequence for e in ministry] == [e.sequence for e in admin] == list(range(1, cp.size + 1))
    assert [e.leaf_hash for e in ministry] == [e.leaf_hash for e in admin]
    funded = set(api.h.ctx.catalog.funded_by("ministry-of-labour"))
    for mine, full in zip(ministry, admin):
        readable = full.event.program.removeprefix("programs/") in funded
        assert mine.HasField("event") is readable
        if readable:
            assert mine.event == full.event
        else:  # nothing but the sequence number and the leaf hash
            assert [f.name for f, _ in mine.ListFields()] == ["sequence", "leaf_hash"]
    assert any(not e.HasField("event") for e in ministry)  # the registry import, at least
    # Resumable: from any sequence number, the same leaves.
    k = max(1, cp.size - 3)
    assert stream(api, MINISTRY, start=k, size=cp.size) == ministry[k - 1:]



def test_a_stream_ends_at_the_tree_size_asked_for_though_the_log_has_grown(api: Api) -> None:
    """StreamEvents sends the leaves up to `tree_size` (a checkpoint's) and none after, however many
    events were logged since: what a funder verifies against that checkpoint."""
    api.activate()
    _, cp = checkpoint_of(api)
    api.activate()
    api.activate()
    assert checkpoint_of(api)[1].size > cp.size
    for caller in ("admin", MINISTRY):
        assert [e.sequence for e in stream(api, caller, size=cp.size)] == list(range(1, cp.size + 1)), caller
        assert [e.sequence for e in stream(api, caller, start=cp.size, size=cp.size)] == [cp.size], caller


def test_list_events_carries_program_and_leaf_hash(api: Api) -> None:
    api.activate()
    page = api.as_(MINISTRY).ListEvents(audit_pb2.ListEventsRequest(page_size=1000))
    assert page.events
    for e in page.events:
        assert e.program == "programs/premium-job-seekers"
        assert log_event(e).leaf_hash() == e.leaf_hash


def test_funder_export_and_offline_verify_with_consistency(api: Api, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    api.activate()
    first = export(capsys, api.h, MINISTRY, tmp_path / "first")
    vkey = (first / "verifier-key.txt").read_text().strip()
    code, output = verify(capsys, first, vkey)
    assert code == 0, output
    assert "OK:" in output
    for _ in range(2):
        api.activate()
    second = export(capsys, api.h, MINISTRY, tmp_path / "second", trusted=first / "checkpoint.txt")
    proof = logformat.ConsistencyProof.from_json((second / "consistency.json").read_text())
    assert proof.old_size < proof.new_size
    code, output = verify(capsys, second, vkey, trusted=first / "checkpoint.txt", previous=first / "events.jsonl")
    assert code == 0, output
    assert "nothing logged before was changed" in output
    # The verifier key may be given as a file; another key fails the signature check.
    code, _ = verify(capsys, second, str(first / "verifier-key.txt"), trusted=first / "checkpoint.txt")
    assert code == 0
    other = note.Signer("entitlement.local/audit-log", note.private_key_from_seed(bytes(32))).verifier.encode()
    code, output = verify(capsys, second, other)
    assert code == 1 and "no signature of the key" in output
    # A lying server's proof (bit flipped) is caught.
    lie = dataclasses.replace(proof, hashes=(bytes([proof.hashes[0][0] ^ 1]) + proof.hashes[0][1:],
                                             *proof.hashes[1:]))
    (second / "consistency.json").write_text(lie.to_json())
    code, output = verify(capsys, second, vkey, trusted=first / "checkpoint.txt")
    assert code == 1 and "consistency proof" in output


def test_keygen_creates_the_log_key_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ENTITLEMENT_LOG_KEY_FILE", str(tmp_path / "secrets" / "log.key"))
    monkeypatch.setenv("ENTITLEMENT_LOG_ORIGIN", "audit.example/entitlement")
    code, output = run_cli(capsys, "audit", "keygen")
    assert code == 0 and "created log signing key" in output
    vkey = output.strip().rsplit(" ", 1)[1]
    assert note.Verifier.parse(vkey).name == "audit.example/entitlement"
    assert (tmp_path / "secrets" / "log.key").stat().st_mode & 0o777 == 0o600
    code, output = run_cli(capsys, "audit", "keygen")
    assert code == 0 and "already exists" in output and output.strip().endswith(vkey)


# ------------------------------------------------------------------------------------------ tampering

@dataclasses.dataclass
class Scene:
    h: Harness
    api: Api
    vkey: str
    trusted: Path  # the funder's first export, verified: checkpoint.txt, events.jsonl
    premium: list[int]  # seqs of events of premium-job-seekers (the ministry reads them)
    opencfa: list[int]  # seqs of events of opencfa-apprentices (redacted for the ministry)


@pytest.fixture
def scene(backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
          capsys: pytest.CaptureFixture[str]) -> Iterator[Scene]:
    """A server of the test's own with some activity, and the ministry's first verified export."""
    with own_server(backend[0], tmp_path / "own", request) as h:
        api = Api(h)
        for program in ["premium-job-seekers"] * 6 + ["opencfa-apprentices"] * 2 + ["premium-job-seekers"] * 2:
            activate(api, program)
        trusted = export(capsys, h, MINISTRY, tmp_path / "trusted")
        vkey = (trusted / "verifier-key.txt").read_text().strip()
        code, output = verify(capsys, trusted, vkey)
        assert code == 0, output
        entries = stream(api, "admin")
        premium = [e.sequence for e in entries if e.event.program == "programs/premium-job-seekers"]
        opencfa = [e.sequence for e in entries if e.event.program == "programs/opencfa-apprentices"]
        for _ in range(2):  # activity after the trusted checkpoint
            activate(api)
        yield Scene(h, api, vkey, trusted, premium, opencfa)


def tamper(h: Harness, *statements: str) -> None:
    """Run SQL on the own server's database with the events table's append-only guard lifted
    (never the shared harness's database)."""
    db = Database(h.url, pool_size=1)
    try:
        with db.write() as s:
            if db.is_sqlite:
                s.execute(text("DROP TRIGGER IF EXISTS events_no_update"))
                s.execute(text("DROP TRIGGER IF EXISTS events_no_delete"))
            else:
                s.execute(text("ALTER TABLE events DISABLE TRIGGER events_append_only"))
            for sql in statements:
                s.execute(text(sql))
    finally:
        db.dispose()


def reexport_and_verify(scene: Scene, capsys: pytest.CaptureFixture[str], tmp: Path, caller: str = MINISTRY,
                        previous: bool = False) -> tuple[int, str]:
    bundle = export(capsys, scene.h, caller, tmp / f"after-{caller}", trusted=scene.trusted / "checkpoint.txt")
    return verify(capsys, bundle, scene.vkey, trusted=scene.trusted / "checkpoint.txt",
                  previous=scene.trusted / "events.jsonl" if previous else None)


def first_bad(output: str) -> str:
    return output.split("first bad sequence number: ", 1)[1].split()[0]


def test_an_edited_event_is_named(scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k = scene.premium[3]
    tamper(scene.h, f"UPDATE events SET reason = 'nothing happened' WHERE seq = {k}")
    code, output = reexport_and_verify(scene, capsys, tmp_path)
    assert code == 1 and first_bad(output) == str(k), output
    assert "modified after it was logged" in output


def test_a_deleted_event_is_named(scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k = scene.premium[2]
    tamper(scene.h, f"DELETE FROM events WHERE seq = {k}")
    code, output = reexport_and_verify(scene, capsys, tmp_path)
    assert code == 1 and first_bad(output) == str(k), output
    assert "missing" in output


def test_an_inserted_event_is_named(scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A forged event slipped in at seq k, the later ones renumbered to make room."""
    k = scene.premium[3]
    tamper(scene.h,
           f"UPDATE events SET seq = -seq WHERE seq >= {k}",
           "UPDATE events SET seq = 1 - seq WHERE seq < 0",
           "INSERT INTO events (seq, time, type, actor, subject, program_id, reason, payload_json, platform_id) "
           f"SELECT {k}, time, type, actor, subject, program_id, 'forged', payload_json, platform_id "
           f"FROM events WHERE seq = {k + 1}")
    code, output = reexport_and_verify(scene, capsys, tmp_path)
    assert code == 1 and first_bad(output) == str(k), output


def test_reordered_events_are_named(scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k = scene.premium[1]
    assert scene.premium[2] == k + 1
    tamper(scene.h,
           f"UPDATE events SET seq = -1 WHERE seq = {k}",
           f"UPDATE events SET seq = {k} WHERE seq = {k + 1}",
           f"UPDATE events SET seq = {k + 1} WHERE seq = -1")
    code, output = reexport_and_verify(scene, capsys, tmp_path)
    assert code == 1 and first_bad(output) == str(k), output


def test_a_change_to_an_event_the_funder_cannot_read_is_caught_by_the_admin(
        scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The documented limit of a filtered view: the ministry checks the leaf hash of another
    funder's event, not its content; a verification with every event (admin, or that funder) names it."""
    k = scene.opencfa[0]
    tamper(scene.h, f"UPDATE events SET reason = 'edited' WHERE seq = {k}")
    code, output = reexport_and_verify(scene, capsys, tmp_path)
    assert code == 0, output
    admin_first = export(capsys, scene.h, "admin", tmp_path / "admin")  # the admin trusts its own copy
    code, output = verify(capsys, admin_first, scene.vkey)
    assert code == 1 and first_bad(output) == str(k), output
    code, output = reexport_and_verify(scene, capsys, tmp_path, caller=IDF)
    assert code == 1 and first_bad(output) == str(k), output


def test_a_rewrite_of_event_and_tree_is_caught_and_located_with_the_previous_export(
        scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An insider who edits an event, recomputes its leaf hash and the whole tree (and lets the
    server sign the result) leaves an export consistent with itself: the trusted checkpoint
    catches it, and the export verified against it then names the event."""
    k = scene.premium[4]
    tamper(scene.h, f"UPDATE events SET reason = 'rewritten' WHERE seq = {k}")
    db = Database(scene.h.url, pool_size=1)
    try:
        with db.read() as s:
            events = s.execute(select(Event).order_by(Event.seq)).scalars().all()
            stored = {(n.level, n.idx): n.hash for n in s.execute(select(LogNode)).scalars()}
        tree = merkle.Tree(LogEvent(e.seq, logformat.time_us(e.time), e.type, e.actor, e.subject, e.program_id or "",
                                    e.reason, e.payload_json).leaf_hash() for e in events)
        changed = {node: h for node, h in tree.nodes.items() if stored.get(node) != h}
        assert changed
        with db.write() as s:
            if db.is_sqlite:
                s.execute(text("DROP TRIGGER log_nodes_no_update"))
            else:
                s.execute(text("ALTER TABLE log_nodes DISABLE TRIGGER log_nodes_append_only"))
            for (level, idx), h in changed.items():
                s.execute(text("UPDATE log_nodes SET hash = :h WHERE level = :l AND idx = :i"),
                          {"h": h, "l": level, "i": idx})
    finally:
        db.dispose()
    code, output = reexport_and_verify(scene, capsys, tmp_path)
    assert code == 1 and first_bad(output) == "unknown", output
    assert "do not hash to the trusted checkpoint" in output
    code, output = reexport_and_verify(scene, capsys, tmp_path, previous=True)
    assert code == 1 and first_bad(output) == str(k), output


def test_an_own_event_edited_and_moved_out_of_view_is_named_with_the_previous_export(
        scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An insider edits one of the ministry's events and moves it to a program the ministry does not
    fund: the new export gives it as a leaf hash only (the stored, untouched one), so the hashes alone
    agree; the export verified before read it in full, and names it (found by a review)."""
    k = scene.premium[3]
    before = [json.loads(line) for line in (scene.trusted / "events.jsonl").read_text().splitlines()]
    assert "reason" in next(e for e in before if e["seq"] == k)  # read in full then
    tamper(scene.h, f"UPDATE events SET reason = 'nothing happened', program_id = 'opencfa-apprentices' "
                    f"WHERE seq = {k}")
    code, output = reexport_and_verify(scene, capsys, tmp_path, previous=True)
    assert code == 1 and first_bad(output) == str(k), output
    assert "moved out of your view" in output


# ------------------------------------------------------------------------------------------ storage

def test_log_nodes_are_append_only(fresh_url: str) -> None:
    upgrade(fresh_url)
    db = Database(fresh_url, pool_size=2)
    try:
        with db.write() as s:
            eventlog.append(s, time=dt.datetime.now(dt.timezone.utc), type="test.event", actor="admin:test",
                            subject="x")
        statements = ["UPDATE log_nodes SET hash = hash", "DELETE FROM log_nodes"]
        if db.dialect == "postgresql":
            statements += ["TRUNCATE log_nodes", "INSERT INTO log_nodes (level, idx, hash) VALUES (0, 0, "
                           "decode(repeat('00', 32), 'hex')) ON CONFLICT (level, idx) DO UPDATE SET hash = "
                           "excluded.hash"]
        else:  # REPLACE deletes the conflicting row without delete triggers: refused by 0013's trigger
            statements.append("INSERT OR REPLACE INTO log_nodes (level, idx, hash) VALUES (0, 0, zeroblob(32))")
        for sql in statements:
            with pytest.raises(DBAPIError) as info:
                with db.write() as s:
                    s.execute(text(sql))
            assert "append-only" in str(info.value.orig), sql
    finally:
        db.dispose()


def test_migration_builds_the_tree_of_events_logged_before_it(fresh_url: str) -> None:
    """Events logged before the log_nodes table existed get their leaves and subtrees, with the
    encoding of entitlement/logformat.py."""
    before = ScriptDirectory.from_config(alembic_config(fresh_url)).get_revision("0005").down_revision
    assert isinstance(before, str)
    command.upgrade(alembic_config(fresh_url), before)
    db = Database(fresh_url, pool_size=2)
    t0 = dt.datetime(2026, 3, 16, 9, 0, 0, 1, tzinfo=dt.timezone.utc)
    try:
        with db.write() as s:
            for seq in range(1, 24):
                s.execute(text("INSERT INTO events (seq, time, type, actor, subject, program_id, reason, "
                               "payload_json) VALUES (:seq, :time, 't', 'system', :subject, :program, 'r é', :p)"),
                          {"seq": seq, "time": t0 + dt.timedelta(seconds=seq, microseconds=seq), "subject": f"s/{seq}",
                           "program": "premium-job-seekers" if seq % 2 else None, "p": json.dumps({"n": seq})})
            s.execute(text("UPDATE log_head SET size = 23 WHERE id = 1"))
        upgrade(fresh_url)
        with db.read() as s:
            events = s.execute(select(Event).order_by(Event.seq)).scalars().all()
            stored = {(n.level, n.idx): bytes(n.hash) for n in s.execute(select(LogNode)).scalars()}
            assert logtree.root(s, 23) == merkle.root(stored[(0, i)] for i in range(23))
        tree = merkle.Tree(LogEvent(e.seq, logformat.time_us(e.time), e.type, e.actor, e.subject, e.program_id or "",
                                    e.reason, e.payload_json).leaf_hash() for e in events)
        assert stored == tree.nodes
        with db.write() as s:  # and the next event continues the same tree
            eventlog.append(s, time=t0, type="t", actor="system", subject="s/24")
        with db.read() as s:
            assert logtree.root(s, 24) == merkle.root([*(tree.nodes[(0, i)] for i in range(23)),
                                                      logtree.leaf_hash(s, 23)])
    finally:
        db.dispose()


def test_concurrent_writers_build_one_consistent_tree(fresh_url: str) -> None:
    upgrade(fresh_url)
    db = Database(fresh_url, pool_size=8)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for i in range(20):
                with db.write() as s:
                    for j in range(1 + (i % 2)):
                        eventlog.append(s, time=dt.datetime.now(dt.timezone.utc), type="test.event",
                                        actor=f"writer:{w}", subject=f"x/{i}/{j}", payload={"w": w})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        with db.read() as s:
            size = logtree.size(s)
            events = s.execute(select(Event).order_by(Event.seq)).scalars().all()
            stored = {(n.level, n.idx): bytes(n.hash) for n in s.execute(select(LogNode)).scalars()}
        assert size == len(events) == 120
        tree = merkle.Tree(LogEvent(e.seq, logformat.time_us(e.time), e.type, e.actor, e.subject, e.program_id or "",
                                    e.reason, e.payload_json).leaf_hash() for e in events)
        assert stored == tree.nodes
    finally:
        db.dispose()


def test_an_export_into_a_path_that_is_a_file_is_one_line_not_a_traceback(
        api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    code, output = run_cli(capsys, "audit", "export", str(taken), "--address", f"127.0.0.1:{api.h.running.port}",
                           f"--token={api.h.tokens['funder-ministry']}")
    assert code == 1 and "Traceback" not in output and "cannot make the export's directory" in output, output


def test_a_refused_export_leaves_no_directory_behind(api: Api, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    code, output = run_cli(capsys, "audit", "export", str(out), "--address", f"127.0.0.1:{api.h.running.port}",
                           f"--token={api.h.tokens['platform-oc']}")  # not a funder: refused
    assert code == 1 and "PERMISSION_DENIED" in output, output
    assert not out.exists()


def test_verify_names_a_line_that_is_not_utf8_text_and_goes_on(
        scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes that are not UTF-8, or a lone surrogate escape (\\ud800), in an event's text: the
    verifier names that event and exits 1 (it ended on a traceback naming nothing)."""
    lines = (scene.trusted / "events.jsonl").read_bytes().splitlines(keepends=True)
    k, j = scene.premium[2], scene.premium[4]
    for i, line in enumerate(lines):
        seq = json.loads(line)["seq"]
        if seq == k:
            lines[i] = line.replace(b'"reason":"', b'"reason":"\xff\xfe', 1)
        elif seq == j:
            lines[i] = line.replace(b'"reason":"', b'"reason":"\\ud800', 1)
    bad = tmp_path / "bad"
    shutil.copytree(scene.trusted, bad)
    (bad / "events.jsonl").write_bytes(b"".join(lines))
    code, output = verify(capsys, bad, scene.vkey)
    assert code == 1 and "Traceback" not in output, output
    assert first_bad(output) == str(min(k, j)), output
    assert f"seq {k}: reason not valid UTF-8 text" in output and f"seq {j}: reason not valid UTF-8 text" in output


def test_previous_events_without_a_trusted_checkpoint_is_refused(
        scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    """`--previous-events` is compared with the trusted checkpoint's leaves: alone it was ignored
    without a word, and the funder believed the comparison made."""
    code, output = run_cli(capsys, "audit", "verify", str(scene.trusted / "events.jsonl"), "--checkpoint",
                           str(scene.trusted / "checkpoint.txt"), "--key", scene.vkey,
                           "--previous-events", str(scene.trusted / "events.jsonl"))
    assert code == 1 and "--previous-events needs --trusted" in output, output


def test_an_export_without_trusted_removes_an_earlier_exports_proof(
        scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Re-exported into the same directory without --trusted, the proof of the export before stayed
    beside checkpoints it does not join (a verification with it then failed, or misled)."""
    bundle = export(capsys, scene.h, MINISTRY, tmp_path / "again", trusted=scene.trusted / "checkpoint.txt")
    assert (bundle / "consistency.json").exists()
    activate(scene.api)
    export(capsys, scene.h, MINISTRY, bundle)
    assert not (bundle / "consistency.json").exists()
    code, output = verify(capsys, bundle, scene.vkey)
    assert code == 0, output


def test_an_empty_log_is_exported_and_verified_against_an_empty_trusted_checkpoint(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A new service's log holds nothing yet: the export streams nothing (a tree size of 0 asks for
    the log's size now) and proves nothing (a consistency proof's new size 0 means the same)."""
    with own_server(backend[0], tmp_path / "own", request, import_registry=False) as h:
        first = export(capsys, h, MINISTRY, tmp_path / "first")
        assert (first / "events.jsonl").read_text() == ""
        vkey = (first / "verifier-key.txt").read_text().strip()
        code, output = verify(capsys, first, vkey)
        assert code == 0, output
        second = export(capsys, h, MINISTRY, tmp_path / "second", trusted=first / "checkpoint.txt")
        assert json.loads((second / "consistency.json").read_text()) == {"old_size": 0, "new_size": 0, "proof": []}
        code, output = verify(capsys, second, vkey, trusted=first / "checkpoint.txt")
        assert code == 0, output


def test_without_a_log_key_get_checkpoint_says_what_to_do_and_not_where_the_server_keeps_it(
        harness: Harness) -> None:
    running = start(dataclasses.replace(harness.ctx, log_signer=None), "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        f = expect_error(As(channel, harness.tokens[MINISTRY]).GetCheckpoint, audit_pb2.GetCheckpointRequest(),
                         grpc.StatusCode.FAILED_PRECONDITION)
        assert f.reason == "LOG_KEY_MISSING" and "entitlement audit keygen" in f.message
        path = str(harness.ctx.settings.log_key_path)
        assert path not in f.message and str(harness.ctx.settings.key_dir) not in f.message, f.message
    finally:
        channel.close()
        running.stop(0)
