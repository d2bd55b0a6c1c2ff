"""The Merkle log's pure parts, no server: RFC 6962 hashing and proofs (entitlement/merkle.py)
against transparency-dev/merkle's known answers and against proofs corrupted as a lying server
would send them; signed notes and checkpoints (entitlement/note.py) against golang.org/x/mod's
note example; the event leaf encoding and the offline verifier (entitlement/logformat.py).

Vectors: tests/data/merkle/ (each file names its source)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from entitlement import logformat, merkle, note
from entitlement.logformat import LogEvent
from entitlement.merkle import ProofError

DATA = Path(__file__).parent / "data" / "merkle"
REF = json.loads((DATA / "transparency_dev_reference.json").read_text())
PROBES = json.loads((DATA / "transparency_dev_testdata.json").read_text())
NOTE = json.loads((DATA / "signed_note_golang.json").read_text(encoding="utf-8"))

LEAVES = [merkle.leaf_hash(bytes.fromhex(d)) for d in REF["leaves"]]
ROOTS = [bytes.fromhex(r) for r in REF["roots"]]
SOME_HASH = bytes.fromhex(REF["some_hash"])
EMPTY_TREE_HASH = bytes.fromhex(REF["empty_tree_hash"])


def hx(values: list[str]) -> list[bytes]:
    return [bytes.fromhex(v) for v in values]


def b64(values: list[str]) -> list[bytes]:
    return [base64.b64decode(v) for v in values]


def fails(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except ProofError:
        return True
    return False


# ------------------------------------------------------------------------------------- hashing

@pytest.mark.parametrize("case", REF["hasher"], ids=lambda c: c["desc"])
def test_rfc6962_hasher_known_answers(case: dict[str, str]) -> None:
    if case["kind"] == "empty":
        got = merkle.root([])
    elif case["kind"] == "leaf":
        got = merkle.leaf_hash(bytes.fromhex(case["data"]))
    else:
        got = merkle.node_hash(bytes.fromhex(case["left"]), bytes.fromhex(case["right"]))
    assert got.hex() == case["want"]


def test_reference_tree_roots_at_every_size() -> None:
    for size in range(1, 9):
        assert merkle.root(LEAVES[:size]) == ROOTS[size - 1], size
        assert merkle.Tree(LEAVES).root(size) == ROOTS[size - 1]
    assert merkle.root([]) == EMPTY_TREE_HASH == merkle.EMPTY_ROOT


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    a, b = merkle.leaf_hash(b"Hello"), merkle.leaf_hash(b"World")
    assert merkle.node_hash(a, b) != merkle.leaf_hash(a + b)
    assert merkle.node_hash(a, b) != merkle.node_hash(b, a)


# ------------------------------------------------------------------------------------- inclusion

INCLUSION = [p for p in REF["inclusion_proofs"] if p["size"] > 0]


@pytest.mark.parametrize("vector", INCLUSION, ids=lambda p: f"leaf{p['leaf']}-size{p['size']}")
def test_inclusion_proofs_are_the_reference_ones(vector: dict[str, object]) -> None:
    index, size = int(vector["leaf"]) - 1, int(vector["size"])  # type: ignore[call-overload]
    expected = hx(vector["proof"])  # type: ignore[arg-type]
    assert merkle.Tree(LEAVES).inclusion_proof(index, size) == expected
    merkle.verify_inclusion(index, size, LEAVES[index], expected, ROOTS[size - 1])


def corrupt_inclusion(index: int, size: int, proof: list[bytes], root: bytes,
                      leaf: bytes) -> list[tuple[str, int, int, list[bytes], bytes, bytes]]:
    """transparency-dev/merkle proof/verify_test.go corruptInclusionProof: what a lying server sends."""
    probes = [
        ("leafIndex - 1", index - 1, size, proof, root, leaf), ("leafIndex + 1", index + 1, size, proof, root, leaf),
        ("leafIndex ^ 2", index ^ 2, size, proof, root, leaf),
        ("treeSize * 2", index, size * 2, proof, root, leaf), ("treeSize / 2", index, size // 2, proof, root, leaf),
        ("wrong leaf", index, size, proof, root, b"WrongLeaf"),
        ("empty root", index, size, proof, EMPTY_TREE_HASH, leaf), ("random root", index, size, proof, SOME_HASH, leaf),
        ("trailing garbage", index, size, proof + [b""], root, leaf),
        ("trailing root", index, size, proof + [root], root, leaf),
        ("preceding garbage", index, size, [b""] + proof, root, leaf),
        ("preceding root", index, size, [root] + proof, root, leaf),
    ]
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([flipped[i][0] ^ 8]) + flipped[i][1:]
        probes.append((f"modified proof[{i}] bit 3", index, size, flipped, root, leaf))
    if proof:
        probes.append(("removed component", index, size, proof[:-1], root, leaf))
    if len(proof) > 1:
        probes.append(("inserted component", index, size, [proof[0], SOME_HASH] + proof[1:], root, leaf))
    return probes


@pytest.mark.parametrize("vector", INCLUSION, ids=lambda p: f"leaf{p['leaf']}-size{p['size']}")
def test_corrupted_inclusion_proofs_are_refused(vector: dict[str, object]) -> None:
    index, size = int(vector["leaf"]) - 1, int(vector["size"])  # type: ignore[call-overload]
    proof = hx(vector["proof"])  # type: ignore[arg-type]
    accepted = [desc for desc, i, s, p, r, leaf in corrupt_inclusion(index, size, proof, ROOTS[size - 1], LEAVES[index])
                if not fails(lambda: merkle.verify_inclusion(i, s, leaf, p, r))]
    assert accepted == []


def test_inclusion_proof_of_a_single_leaf_tree() -> None:
    h = merkle.leaf_hash(b"data")
    merkle.verify_inclusion(0, 1, h, [], h)  # the root of one leaf is its hash; the proof is empty
    for root, leaf in ((h, b""), (b"", h), (b"", b"")):
        assert fails(lambda: merkle.verify_inclusion(0, 1, leaf, [], root))


@pytest.mark.parametrize("index,size", [(0, 0), (0, 1), (1, 0), (2, 1)])
def test_inclusion_in_impossible_positions_is_refused(index: int, size: int) -> None:
    for leaf, root in ((SOME_HASH, b""), (b"", EMPTY_TREE_HASH), (SOME_HASH, EMPTY_TREE_HASH)):
        assert fails(lambda: merkle.verify_inclusion(index, size, leaf, [], root))


# ------------------------------------------------------------------------------------- consistency

@pytest.mark.parametrize("vector", REF["consistency_proofs"], ids=lambda p: f"{p['size1']}-{p['size2']}")
def test_consistency_proofs_are_the_reference_ones(vector: dict[str, object]) -> None:
    old, new = int(vector["size1"]), int(vector["size2"])  # type: ignore[call-overload]
    expected = hx(vector["proof"])  # type: ignore[arg-type]
    assert merkle.Tree(LEAVES).consistency_proof(old, new) == expected
    merkle.verify_consistency(old, new, expected, ROOTS[old - 1], ROOTS[new - 1])


WRONG_ROOT = b"WrongRoot".ljust(merkle.HASH_SIZE, b".")


def corrupt_consistency(old: int, new: int, root1: bytes, root2: bytes,
                        proof: list[bytes]) -> list[tuple[str, int, int, bytes, bytes, list[bytes]]]:
    """transparency-dev/merkle proof/verify_test.go corruptConsistencyProof."""
    probes = [
        ("size1 - 1", old - 1, new, root1, root2, proof), ("size1 + 1", old + 1, new, root1, root2, proof),
        ("size1 ^ 2", old ^ 2, new, root1, root2, proof),
        ("size2 * 2", old, new * 2, root1, root2, proof), ("size2 / 2", old, new // 2, root1, root2, proof),
        ("wrong root1", old, new, b"WrongRoot", root2, proof), ("wrong root2", old, new, root1, b"WrongRoot", proof),
        # The same of a hash's size: b"WrongRoot" is refused for its length before any hashing, so
        # these alone show the roots are compared (an old size not a power of two: only root1 is).
        ("wrong root1 of 32 bytes", old, new, WRONG_ROOT, root2, proof),
        ("wrong root2 of 32 bytes", old, new, root1, WRONG_ROOT, proof),
        ("swapped roots", old, new, root2, root1, proof), ("empty proof", old, new, root1, root2, []),
        ("trailing garbage", old, new, root1, root2, proof + [b""]),
        ("trailing root1", old, new, root1, root2, proof + [root1]),
        ("trailing root2", old, new, root1, root2, proof + [root2]),
        ("preceding garbage", old, new, root1, root2, [b""] + proof),
        ("preceding root1", old, new, root1, root2, [root1] + proof),
        ("preceding root2", old, new, root1, root2, [root2] + proof),
        ("preceding proof[0]", old, new, root1, root2, [proof[0]] + proof),
        ("truncated proof", old, new, root1, root2, proof[:-1]),
    ]
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([flipped[i][0] ^ 16]) + flipped[i][1:]
        probes.append((f"modified proof[{i}] bit 4", old, new, root1, root2, flipped))
    return probes


@pytest.mark.parametrize("vector", [v for v in REF["consistency_proofs"] if v["proof"]],
                         ids=lambda p: f"{p['size1']}-{p['size2']}")
def test_corrupted_consistency_proofs_are_refused(vector: dict[str, object]) -> None:
    old, new = int(vector["size1"]), int(vector["size2"])  # type: ignore[call-overload]
    proof = hx(vector["proof"])  # type: ignore[arg-type]
    accepted = [desc for desc, o, n, r1, r2, p in corrupt_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], proof)
                if not fails(lambda: merkle.verify_consistency(o, n, p, r1, r2))]
    assert accepted == []


R1, R2 = b"don't care 1".ljust(32, b"."), b"don't care 2".ljust(32, b".")


@pytest.mark.parametrize("old,new,root1,root2,proof,ok", [
    (0, 0, R1, R2, [], False), (1, 1, R1, R2, [], False),
    (0, 0, R1, R1, [], True), (0, 1, R1, R2, [], True), (1, 1, R2, R2, [], True),  # always consistent
    (1, 0, R1, R2, [], False), (2, 1, R1, R2, [], False),  # time travel
    (1, 2, R1, R2, [], False),  # empty proof
    (0, 0, EMPTY_TREE_HASH, R2, [], False), (1, 1, EMPTY_TREE_HASH, R2, [], False),  # roots differ
    (0, 0, EMPTY_TREE_HASH, EMPTY_TREE_HASH, [EMPTY_TREE_HASH], False),  # roots match, proof not empty
    (0, 1, EMPTY_TREE_HASH, EMPTY_TREE_HASH, [EMPTY_TREE_HASH], False),
    (1, 1, EMPTY_TREE_HASH, EMPTY_TREE_HASH, [EMPTY_TREE_HASH], False),
])
def test_consistency_edge_cases(old: int, new: int, root1: bytes, root2: bytes, proof: list[bytes], ok: bool) -> None:
    """transparency-dev/merkle TestVerifyConsistency's table."""
    assert fails(lambda: merkle.verify_consistency(old, new, proof, root1, root2)) is not ok


# ------------------------------------------------------------------------------------- testdata/ probes

@pytest.mark.parametrize("probe", PROBES["inclusion"], ids=lambda p: p["path"])
def test_transparency_dev_inclusion_probes(probe: dict[str, object]) -> None:
    def check() -> None:
        merkle.verify_inclusion(int(probe["leafIdx"]), int(probe["treeSize"]),  # type: ignore[call-overload]
                                base64.b64decode(str(probe["leafHash"])), b64(probe["proof"]),  # type: ignore[arg-type]
                                base64.b64decode(str(probe["root"])))
    assert fails(check) is probe["wantErr"]


@pytest.mark.parametrize("probe", PROBES["consistency"], ids=lambda p: p["path"])
def test_transparency_dev_consistency_probes(probe: dict[str, object]) -> None:
    def check() -> None:
        merkle.verify_consistency(int(probe["size1"]), int(probe["size2"]),  # type: ignore[call-overload]
                                  b64(probe["proof"]), base64.b64decode(str(probe["root1"])),  # type: ignore[arg-type]
                                  base64.b64decode(str(probe["root2"])))
    assert fails(check) is probe["wantErr"]


# ------------------------------------------------------------------------------------- every tree up to 70

def random_leaves(n: int, seed: int = 7) -> list[bytes]:
    rnd = random.Random(seed)
    return [merkle.leaf_hash(rnd.randbytes(rnd.randrange(0, 40))) for _ in range(n)]


def reference_mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1, literally."""
    if not leaves:
        return merkle.EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = merkle.split(len(leaves))
    return merkle.node_hash(reference_mth(leaves[:k]), reference_mth(leaves[k:]))


def test_every_proof_of_every_tree_up_to_70_leaves_verifies_and_a_flipped_bit_does_not() -> None:
    leaves = random_leaves(70)
    tree = merkle.Tree(leaves)
    rnd = random.Random(1)
    for size in range(1, 71):
        root = tree.root(size)
        assert root == reference_mth(leaves[:size])
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            merkle.verify_inclusion(index, size, leaves[index], proof, root)
            if proof:
                i = rnd.randrange(len(proof))
                bad = list(proof)
                bad[i] = bytes([bad[i][0] ^ (1 << rnd.randrange(8))]) + bad[i][1:]
                assert fails(lambda: merkle.verify_inclusion(index, size, leaves[index], bad, root))
        for old in range(0, size + 1):
            proof = tree.consistency_proof(old, size)
            merkle.verify_consistency(old, size, proof, tree.root(old), root)
            if proof:
                assert fails(lambda: merkle.verify_consistency(old, size, proof[:-1], tree.root(old), root))
                assert fails(lambda: merkle.verify_consistency(old, size, proof + [root], tree.root(old), root))


def test_a_proof_for_another_size_does_not_verify() -> None:
    leaves = random_leaves(40, seed=3)
    tree = merkle.Tree(leaves)
    proof = tree.inclusion_proof(5, 33)
    assert fails(lambda: merkle.verify_inclusion(5, 34, leaves[5], proof, tree.root(34)))
    proof = tree.consistency_proof(10, 33)
    assert fails(lambda: merkle.verify_consistency(11, 33, proof, tree.root(11), tree.root(33)))


def test_subtree_decomposition_matches_the_rfc_recursion() -> None:
    for size in range(1, 300):
        nodes = merkle.head_nodes(size)
        assert sum(1 << level for level, _ in nodes) == size
        assert len(nodes) == bin(size).count("1")
    with pytest.raises(ValueError):
        merkle.subtree_nodes(1, 4)  # not a range a proof asks for


def test_compact_range_reports_each_complete_subtree_once() -> None:
    seen: dict[tuple[int, int], bytes] = {}
    cr = merkle.CompactRange()
    leaves = random_leaves(37)
    for h in leaves:
        cr.append(h, lambda level, index, node: seen.__setitem__((level, index), node))
    assert cr.root() == reference_mth(leaves)
    expected = {(level, index) for level in range(6) for index in range(37 >> level)}
    assert set(seen) == expected
    assert seen[(5, 0)] == reference_mth(leaves[:32])


# ------------------------------------------------------------------------------------- signed notes

def golang_signer() -> note.Signer:
    _, _, name, _, key = NOTE["signer_key"].split("+", 4)
    return note.Signer(name, note.private_key_from_seed(base64.b64decode(key)[1:]))


def test_signed_note_reproduces_the_golang_example() -> None:
    signer = golang_signer()
    assert signer.verifier.encode() == NOTE["verifier_key"]
    assert signer.sign(NOTE["text"]) == NOTE["signed"]  # Ed25519 is deterministic
    verifier = note.Verifier.parse(NOTE["verifier_key"])
    assert note.open_note(NOTE["signed"], verifier) == NOTE["text"]
    assert verifier.key_id.hex() == "c74f20a3"


def test_a_note_altered_or_signed_by_another_key_is_refused() -> None:
    verifier = note.Verifier.parse(NOTE["verifier_key"])
    altered = NOTE["signed"].replace("cryptography", "cryptograph")
    with pytest.raises(note.NoteError, match="does not verify"):
        note.open_note(altered, verifier)
    other = note.Signer("PeterNeumann", note.private_key_from_seed(bytes(32)))
    with pytest.raises(note.NoteError, match="no signature of the key"):
        note.open_note(other.sign(NOTE["text"]), verifier)  # same name, another key ID: ignored
    # A second signature by an unknown key is ignored; the known one still verifies.
    cosigned = NOTE["signed"] + other.sign(NOTE["text"]).split("\n\n")[1].replace("PeterNeumann", "witness.example")
    assert note.open_note(cosigned, verifier) == NOTE["text"]
    for bad in (NOTE["text"], NOTE["signed"].rstrip("\n"), NOTE["signed"].replace("\u2014", "-"),
                NOTE["signed"].replace("x08go", "x08g!")):
        with pytest.raises(note.NoteError):
            note.open_note(bad, verifier)


@pytest.mark.parametrize("vkey", [
    "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong key ID
    "PeterNeumann+c74f20a3+Apc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # not type 0x01
    "PeterNeumann+c74f20a3",
    "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
])
def test_bad_verifier_keys_are_refused(vkey: str) -> None:
    with pytest.raises(note.NoteError):
        note.Verifier.parse(vkey)


def test_key_id_is_sha256_of_name_newline_type_and_key() -> None:
    import hashlib
    signer = note.Signer("entitlement.local/audit-log", note.private_key_from_seed(bytes(range(32))))
    public = base64.b64decode(signer.verifier.encode().split("+", 2)[2])
    assert public[0] == 0x01 and len(public) == 33
    assert signer.verifier.key_id == hashlib.sha256(b"entitlement.local/audit-log\n\x01" + public[1:]).digest()[:4]


def test_checkpoint_text_signature_and_parsing() -> None:
    signer = note.Signer("entitlement.local/audit-log", note.private_key_from_seed(bytes(range(32))))
    cp = note.Checkpoint("entitlement.local/audit-log", 8, ROOTS[7])
    signed = note.sign_checkpoint(cp, signer)
    lines = signed.split("\n")
    assert lines[:4] == ["entitlement.local/audit-log", "8", "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=", ""]
    assert lines[4].startswith("\u2014 entitlement.local/audit-log ") and lines[5] == ""
    sig = base64.b64decode(lines[4].split(" ")[2])
    assert sig[:4] == signer.verifier.key_id and len(sig) == 68
    assert note.open_checkpoint(signed, note.Verifier.parse(signer.verifier.encode())) == cp
    with pytest.raises(note.NoteError, match="not 'other.example/log'"):
        note.open_checkpoint(signed, signer.verifier, origin="other.example/log")
    for text in ("o\n08\n" + base64.b64encode(ROOTS[0]).decode() + "\n", "o\n8\nAAAA\n", "o\n8\n", "o\n-1\nx\n",
                 "o\n8\n" + base64.b64encode(ROOTS[0]).decode() + "\n\n"):
        with pytest.raises(note.NoteError):
            note.parse_checkpoint(text)
    assert note.parse_checkpoint("o\n0\n" + base64.b64encode(merkle.EMPTY_ROOT).decode() + "\next\n").extensions == ("ext",)


# ------------------------------------------------------------------------------------- event leaves

EVENT = LogEvent(seq=7, time_us=logformat.time_us(dt.datetime(2026, 3, 16, 10, 0, 0, 123456, tzinfo=dt.timezone.utc)),
                 type="activation.created", actor="advisor:A0001@75011", subject="activations/" + "a" * 32,
                 program_id="premium-job-seekers", reason="début", payload_json='{"months":6}')


def test_the_leaf_encoding_is_the_documented_one() -> None:
    """The encoding of logformat's docstring (and of audit.proto), byte for byte: frozen."""
    def s(text: str) -> bytes:
        b = text.encode()
        return len(b).to_bytes(4, "big") + b
    expected = (s("entitlement/event/v1") + (7).to_bytes(8, "big") + (1773655200123456).to_bytes(8, "big")
                + s("activation.created") + s("advisor:A0001@75011") + s("activations/" + "a" * 32)
                + s("premium-job-seekers") + s("début") + s('{"months":6}'))
    assert EVENT.leaf_data() == expected
    assert EVENT.leaf_hash() == merkle.leaf_hash(expected)


def test_the_leaf_hash_depends_on_every_field() -> None:
    import dataclasses
    hashes = {EVENT.leaf_hash()}
    for name, value in (("seq", 8), ("time_us", EVENT.time_us + 1), ("type", "x"), ("actor", "x"), ("subject", "x"),
                        ("program_id", ""), ("reason", "x"), ("payload_json", "{}")):
        hashes.add(dataclasses.replace(EVENT, **{name: value}).leaf_hash())
    assert len(hashes) == 9
    # Length prefixes: moving a character from one field to the next changes the hash.
    assert dataclasses.replace(EVENT, actor="ab", subject="c").leaf_hash() != \
        dataclasses.replace(EVENT, actor="a", subject="bc").leaf_hash()


def test_times_round_trip_at_the_microsecond() -> None:
    for micros in (0, 1, 1773655200123456, 1773655200000000, -1):
        assert logformat.parse_time(logformat.format_time(micros)) == micros
    assert logformat.format_time(1773655200123456) == "2026-03-16T10:00:00.123456Z"
    paris = dt.datetime(2026, 3, 16, 11, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert logformat.time_us(paris) == 1773655200123456
    for bad in ("2026-03-16T10:00:00Z", "2026-03-16T10:00:00.123456+00:00", "2026-13-16T10:00:00.123456Z", 5):
        with pytest.raises(logformat.FormatError):
            logformat.parse_time(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- the verifier, offline

SIGNER = note.Signer("entitlement.local/audit-log", note.private_key_from_seed(bytes(range(32))))


def make_log(n: int, hidden: set[int] = frozenset()) -> tuple[list[LogEvent], list[str]]:  # type: ignore[assignment]
    events = [LogEvent(seq, 1773655200000000 + seq * 1000, "activation.created", "advisor:A0001@75011",
                       f"activations/{seq:032x}", "premium-job-seekers" if seq % 3 else "", f"reason {seq}",
                       json.dumps({"n": seq})) for seq in range(1, n + 1)]
    lines = [logformat.entry_line(e.seq, e.leaf_hash(), None if e.seq in hidden else e) for e in events]
    return events, lines


def checkpoint(events: list[LogEvent], size: int) -> note.Checkpoint:
    return note.Checkpoint(SIGNER.name, size, merkle.root(e.leaf_hash() for e in events[:size]))


def run(lines: list[str], events: list[LogEvent], *, old: int | None = None, size: int | None = None,
        previous: list[str] | None = None, proof: logformat.ConsistencyProof | None = None) -> logformat.Report:
    size = len(events) if size is None else size
    trusted = checkpoint(events, old) if old is not None else None
    return logformat.verify_log(lines, checkpoint(events, size), trusted=trusted, proof=proof, previous=previous)


def test_a_faithful_export_verifies_with_its_consistency_proof() -> None:
    events, lines = make_log(50, hidden={4, 5, 30})
    tree = merkle.Tree(e.leaf_hash() for e in events)
    proof = logformat.ConsistencyProof(21, 50, tuple(tree.consistency_proof(21, 50)))
    report = run(lines, events, old=21, proof=proof, previous=lines[:21])
    assert report.ok, report.problems
    assert (report.entries, report.readable, report.redacted) == (50, 47, 3)
    bad = logformat.ConsistencyProof(21, 50, tuple(tree.consistency_proof(20, 50)))
    assert not run(lines, events, old=21, proof=bad).ok


def edited(line: str, **changes: object) -> str:
    record = json.loads(line)
    record.update(changes)
    return json.dumps(record)


@pytest.mark.parametrize("tamper,first", [
    ("modify", 12), ("delete", 12), ("insert", 12), ("reorder", 12), ("truncate", 48), ("extend", 51),
    ("duplicate", 12), ("renumber-after-delete", 12), ("redact-change", 20),
])
def test_the_verifier_names_the_first_bad_sequence_number(tamper: str, first: int) -> None:
    events, lines = make_log(50, hidden={20})
    k = 11  # the line of seq 12
    bad = list(lines)
    if tamper == "modify":
        bad[k] = edited(bad[k], reason="changed")
    elif tamper == "delete":
        del bad[k]
    elif tamper == "insert":  # a forged event at seq 12, later ones renumbered (as a database insert would)
        forged = LogEvent(12, events[11].time_us, "activation.created", "advisor:X", "activations/" + "f" * 32,
                          "premium-job-seekers", "forged", "{}")
        bad = lines[:k] + [logformat.entry_line(12, forged.leaf_hash(), forged)] + \
            [edited(line, seq=json.loads(line)["seq"] + 1) for line in lines[k:-1]]
    elif tamper == "reorder":
        bad[k], bad[k + 1] = bad[k + 1], bad[k]
    elif tamper == "truncate":
        bad = bad[:47]
    elif tamper == "extend":
        bad.append(logformat.entry_line(51, events[0].leaf_hash(), None))
    elif tamper == "duplicate":
        bad.insert(k + 1, bad[k])
    elif tamper == "renumber-after-delete":  # seq 12 deleted, later ones renumbered down
        bad = lines[:k] + [edited(line, seq=json.loads(line)["seq"] - 1) for line in lines[k + 1:]] + [lines[-1]]
    elif tamper == "redact-change":  # a leaf hash the funder cannot check against content
        bad[19] = edited(bad[19], leaf_hash=base64.b64encode(bytes(32)).decode())
        assert run(bad, events, old=30).first_bad_seq is None  # detected, not located...
        report = run(bad, events, old=30, previous=lines[:30])  # ... unless with the export verified before
        assert report.first_bad_seq == first, report.problems
        return
    report = run(bad, events, old=30)
    assert not report.ok
    assert report.first_bad_seq == first, report.problems


def test_rewritten_leaf_hashes_are_located_with_the_previous_export() -> None:
    """An insider who rewrites an event and its stored leaf hash (and the tree, and re-signs) makes
    the export self-consistent: only the trusted checkpoint notices, and the export verified then
    says where."""
    events, lines = make_log(40)
    import dataclasses
    forged = dataclasses.replace(events[8], reason="rewritten")
    rewritten = list(events)
    rewritten[8] = forged
    bad = list(lines)
    bad[8] = logformat.entry_line(9, forged.leaf_hash(), forged)
    new_cp = note.Checkpoint(SIGNER.name, 40, merkle.root(e.leaf_hash() for e in rewritten))
    trusted = checkpoint(events, 25)
    report = logformat.verify_log(bad, new_cp, trusted=trusted)
    assert not report.ok and report.first_bad_seq is None
    assert "do not hash to the trusted checkpoint" in report.problems[0].message
    report = logformat.verify_log(bad, new_cp, trusted=trusted, previous=lines[:25])
    assert report.first_bad_seq == 9, report.problems
    # A change after the trusted size: located to the range after it.
    bad = list(lines)
    bad[30] = logformat.entry_line(31, dataclasses.replace(events[30], reason="x").leaf_hash(),
                                   dataclasses.replace(events[30], reason="x"))
    report = logformat.verify_log(bad, checkpoint(events, 40), trusted=trusted)
    assert "after seq 25" in report.problems[0].message


def test_malformed_lines_are_named_by_sequence_number() -> None:
    events, lines = make_log(10)
    for garbage in ("not json", "[]", '{"seq": 4}', '{"seq": 4, "leaf_hash": "AAAA"}',
                    edited(lines[3], time="yesterday"), edited(lines[3], reason=5)):
        bad = list(lines)
        bad[3] = garbage
        report = run(bad, events)
        assert report.first_bad_seq == 4, (garbage, report.problems)


def test_a_trusted_checkpoint_larger_than_the_new_one_fails() -> None:
    events, lines = make_log(10)
    report = logformat.verify_log(lines[:5], checkpoint(events, 5), trusted=checkpoint(events, 8))
    assert not report.ok and "older than the trusted one" in report.problems[0].message
