"""The event log as an outsider verifies it, without the service or its database: the leaf
encoding of an event, the export file a funder downloads, and the verifier (`entitlement audit
verify`). Pure: the verifier reads files and nothing else.

Leaf data of an event (version 1), the bytes hashed into the Merkle tree (leaf i is the event with
seq i + 1; leaf hash = SHA-256(0x00 || leaf data)):

    str("entitlement/event/v1")
    || uint64(seq)
    || int64(time: microseconds since 1970-01-01T00:00:00Z)
    || str(type) || str(actor) || str(subject)
    || str(program_id, "" for an event about no program)
    || str(reason) || str(payload_json)

with integers big-endian and str(s) = uint32(byte length of UTF-8 s) || UTF-8 bytes of s. The
strings are exactly as logged (payload_json is the canonical JSON text stored, not re-serialised).

Export file (JSON Lines, UTF-8, one object per leaf, seq 1 to the checkpoint's tree size, in order):

    {"seq": 7, "leaf_hash": "<base64>", "time": "2026-03-16T10:00:00.000000Z", "type": ...,
     "actor": ..., "subject": ..., "program_id": ..., "reason": ..., "payload_json": ...}
    {"seq": 8, "leaf_hash": "<base64>"}        an event the funder may not read: its leaf hash only

`time` is RFC 3339 in UTC with exactly six fractional digits. `leaf_hash` is the hash the service
stored when it logged the event; the verifier recomputes it from the event's fields.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entitlement import merkle, note

LEAF_TAG = "entitlement/event/v1"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
EVENT_FIELDS = ("time", "type", "actor", "subject", "program_id", "reason", "payload_json")
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
_U32 = struct.Struct(">I")
_SEQ_TIME = struct.Struct(">Qq")
_TAG = _U32.pack(len(LEAF_TAG)) + LEAF_TAG.encode()


class FormatError(ValueError):
    pass


# ------------------------------------------------------------------------------------ leaves

def time_us(time: dt.datetime) -> int:
    """Microseconds since the epoch; a naive datetime is UTC (SQLite returns them naive)."""
    if time.tzinfo is None:
        time = time.replace(tzinfo=dt.timezone.utc)
    return (time - EPOCH) // dt.timedelta(microseconds=1)


def format_time(micros: int) -> str:
    return (EPOCH + dt.timedelta(microseconds=micros)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> int:
    if not isinstance(text, str) or not _TIME_RE.fullmatch(text):
        raise FormatError(f"time {str(text)[:40]!r} is not RFC 3339 UTC with 6 fractional digits")
    try:
        return time_us(dt.datetime.fromisoformat(text[:-1]))
    except ValueError:
        raise FormatError(f"time {text!r} is not a valid instant") from None


def _str(value: str) -> bytes:
    b = value.encode("utf-8")
    return _U32.pack(len(b)) + b


@dataclass(frozen=True)
class LogEvent:
    """One event as it enters the tree."""

    seq: int
    time_us: int
    type: str
    actor: str
    subject: str
    program_id: str
    reason: str
    payload_json: str

    def leaf_data(self) -> bytes:
        return b"".join((_TAG, _SEQ_TIME.pack(self.seq, self.time_us), _str(self.type), _str(self.actor),
                         _str(self.subject), _str(self.program_id), _str(self.reason), _str(self.payload_json)))

    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.leaf_data())


# ------------------------------------------------------------------------------------ export lines

@dataclass(frozen=True)
class Entry:
    """One line of an export: the leaf hash the service gave, and the event when readable."""

    seq: int
    leaf_hash: bytes | None
    event: LogEvent | None


def entry_line(seq: int, leaf_hash: bytes, event: LogEvent | None) -> str:
    record: dict[str, Any] = {"seq": seq, "leaf_hash": base64.b64encode(leaf_hash).decode()}
    if event is not None:
        record.update(time=format_time(event.time_us), type=event.type, actor=event.actor, subject=event.subject,
                      program_id=event.program_id, reason=event.reason, payload_json=event.payload_json)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def parse_entry(line: str) -> Entry:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FormatError(f"not JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise FormatError("not a JSON object")
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq < 1 << 63:
        raise FormatError("no valid \"seq\" (a positive integer)")
    leaf_hash = None
    if "leaf_hash" in record:
        raw = record["leaf_hash"]
        try:
            leaf_hash = base64.b64decode(raw, validate=True) if isinstance(raw, str) else b""
        except (binascii.Error, ValueError):
            leaf_hash = b""
        if len(leaf_hash) != merkle.HASH_SIZE:
            raise FormatError(f"seq {seq}: \"leaf_hash\" is not 32 bytes in base64")
    present = [name for name in EVENT_FIELDS if name in record]
    if not present:
        if leaf_hash is None:
            raise FormatError(f"seq {seq}: neither an event nor a leaf hash")
        return Entry(seq, leaf_hash, None)
    missing = [name for name in EVENT_FIELDS if name not in record]
    if missing:
        raise FormatError(f"seq {seq}: event without {', '.join(missing)}")
    strings = {name: record[name] for name in EVENT_FIELDS if name != "time"}
    bad = [name for name, value in strings.items() if not isinstance(value, str)]
    if bad:
        raise FormatError(f"seq {seq}: {', '.join(bad)} must be strings")
    # Text that is not UTF-8 (bytes read_lines could not decode, or a lone surrogate escape such as
    # \ud800) hashes to nothing: this entry is bad, the verifier goes on (it raised a traceback).
    unencodable = [name for name, value in strings.items() if not _utf8(value)]
    if unencodable:
        raise FormatError(f"seq {seq}: {', '.join(unencodable)} not valid UTF-8 text")
    return Entry(seq, leaf_hash, LogEvent(seq=seq, time_us=parse_time(record["time"]), **strings))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_lines(path: Path) -> Iterator[str]:
    """The file's non-blank lines. Bytes that are not UTF-8 are kept as lone surrogates
    (surrogateescape), so that the line they are on is reported bad (parse_entry), not the file."""
    with path.open("rb") as fh:
        for raw in fh:
            line = raw.decode("utf-8", errors="surrogateescape")
            if line.strip():
                yield line


# ------------------------------------------------------------------------------------ consistency proofs

@dataclass(frozen=True)
class ConsistencyProof:
    old_size: int
    new_size: int
    hashes: tuple[bytes, ...]

    def to_json(self) -> str:
        return json.dumps({"old_size": self.old_size, "new_size": self.new_size,
                           "proof": [base64.b64encode(h).decode() for h in self.hashes]}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ConsistencyProof":
        try:
            doc = json.loads(text)
            hashes = tuple(base64.b64decode(h, validate=True) for h in doc["proof"])
            return cls(int(doc["old_size"]), int(doc["new_size"]), hashes)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise FormatError(f"not a consistency proof file ({exc})") from None


# ------------------------------------------------------------------------------------ verification

@dataclass(frozen=True)
class Problem:
    seq: int | None  # the first sequence number concerned, when it can be named
    message: str


@dataclass
class Report:
    checkpoint: note.Checkpoint
    trusted: note.Checkpoint | None
    entries: int = 0
    readable: int = 0
    redacted: int = 0
    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_seq(self) -> int | None:
        seqs = [p.seq for p in self.problems if p.seq is not None]
        return min(seqs) if seqs else None


class _Problems:
    def __init__(self, report: Report, limit: int) -> None:
        self.report, self.limit = report, limit

    def add(self, seq: int | None, message: str) -> None:
        if len(self.report.problems) < self.limit:
            self.report.problems.append(Problem(seq, message))
        else:
            self.report.more_problems += 1


def verify_log(lines: Iterable[str], checkpoint: note.Checkpoint, *, trusted: note.Checkpoint | None = None,
               proof: ConsistencyProof | None = None, previous: Iterable[str] | None = None,
               max_problems: int = 20) -> Report:
    """Check an export against a checkpoint (already signature-checked), and against the trusted
    earlier checkpoint when given:

    1. the lines are seq 1, 2, ... without gap, repetition or disorder, up to the checkpoint's size;
    2. every readable event hashes to the leaf hash the service gave for it;
    3. the leaves hash to the checkpoint's root, and their first `trusted.size` to the trusted root;
    4. the service's consistency proof from the trusted checkpoint to this one verifies;
    5. with `previous` (the export verified against the trusted checkpoint), each of its leaf hashes
       is still the same: this names the first rewritten event even when its stored leaf hash was
       rewritten too (which 3. detects but cannot place).
    """
    report = Report(checkpoint, trusted)
    problems = _Problems(report, max_problems)
    size = checkpoint.size
    old_size = trusted.size if trusted is not None else 0
    if trusted is not None and trusted.size > size:
        problems.add(None, f"the checkpoint ({size} events) is older than the trusted one ({trusted.size})")
        return report
    tree = merkle.CompactRange()
    old_root = merkle.EMPTY_ROOT if old_size == 0 else None
    broken = False
    expected = 1
    beyond = False
    prev_iter = iter(previous) if previous is not None else None
    prev_tree = merkle.CompactRange() if prev_iter is not None else None
    prev_first_difference: int | None = None
    prev_first_hidden: int | None = None  # read in full in the previous export, a leaf hash only now
    for lineno, line in enumerate(lines, start=1):
        try:
            entry = parse_entry(line)
        except FormatError as exc:
            problems.add(expected, f"line {lineno}: {exc}")
            broken = True
            expected += 1
            continue
        seq = entry.seq
        report.entries += 1
        if seq > size:
            if not beyond:
                problems.add(seq, f"seq {seq}: beyond the checkpoint, which covers {size} events")
                beyond = True
            continue
        if seq > expected:
            missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
            problems.add(expected, f"{missing}: missing (deleted from the log, or left out of the file)")
            broken = True
            expected = seq + 1
        elif seq < expected:
            problems.add(seq, f"seq {seq}: appears again or out of order after seq {expected - 1} "
                              f"(an event inserted or moved)")
            broken = True
            continue
        else:
            expected += 1
        if entry.event is not None:
            report.readable += 1
            h = entry.event.leaf_hash()
            if entry.leaf_hash is not None and entry.leaf_hash != h:
                moved = _logged_as(entry.event, entry.leaf_hash)
                if moved is None:
                    problems.add(seq, f"seq {seq}: the event does not match the leaf hash logged for it "
                                      f"(modified after it was logged)")
                elif moved < seq:
                    problems.add(moved, f"seq {moved}: an event was inserted here (the event now at seq {seq} "
                                        f"was logged as seq {moved})")
                else:
                    problems.add(seq, f"seq {seq}: an event was removed here (the event now at seq {seq} was "
                                      f"logged as seq {moved})")
        else:
            report.redacted += 1
            assert entry.leaf_hash is not None
            h = entry.leaf_hash
        if broken:
            continue
        tree.append(h)
        if tree.size == old_size:
            old_root = tree.root()
        if prev_iter is not None and prev_tree is not None and seq <= old_size:
            prev = _previous_entry(prev_iter, seq)
            prev_hash = None if prev is None else prev[0]
            if prev is not None and prev[1] and entry.event is None and prev_first_hidden is None:
                prev_first_hidden = seq  # read in full before, a leaf hash only now: moved out of view
            if prev_hash is None:
                prev_iter = None
                problems.add(None, f"the previous export ends or is malformed before seq {seq}: it cannot "
                                   f"locate changes")
            else:
                prev_tree.append(prev_hash)
                if prev_hash != h and prev_first_difference is None:
                    prev_first_difference = seq
    if expected - 1 < size and not beyond:
        missing = f"seq {expected}" if expected == size else f"seq {expected} to {size}"
        problems.add(expected, f"{missing}: missing (the checkpoint covers {size} events)")
        broken = True
    if broken:
        return report
    root = tree.root()
    previous_ok = prev_tree is not None and prev_iter is not None and prev_tree.size == old_size and \
        trusted is not None and prev_tree.root() == trusted.root_hash
    if prev_first_hidden is not None and previous_ok:
        problems.add(prev_first_hidden, f"seq {prev_first_hidden}: you read this event in full in the export you "
                                        f"verified before; it now comes as a leaf hash only (its program or "
                                        f"subject was changed: moved out of your view)")
    if prev_first_difference is not None and previous_ok:
        problems.add(prev_first_difference, f"seq {prev_first_difference}: its leaf hash is not the one you "
                                            f"verified before against the trusted checkpoint (rewritten)")
    if trusted is not None and old_root != trusted.root_hash:
        if prev_first_difference is None:
            problems.add(None, f"the first {old_size} events do not hash to the trusted checkpoint's root: the "
                               f"record was rewritten (give the export you verified then, --previous-events, "
                               f"to locate the first change)")
        else:
            problems.add(None, f"the first {old_size} events do not hash to the trusted checkpoint's root")
    elif root != checkpoint.root_hash:
        where = f" (the first {old_size} match the trusted checkpoint: the difference is after seq {old_size})" \
            if trusted is not None else ""
        problems.add(None, f"the events do not hash to the checkpoint's root{where}")
    if proof is not None:
        if trusted is None:
            problems.add(None, "a consistency proof needs the trusted checkpoint it starts from")
        elif (proof.old_size, proof.new_size) != (old_size, size):
            problems.add(None, f"the consistency proof is from {proof.old_size} to {proof.new_size} events, the "
                               f"checkpoints are of {old_size} and {size}")
        else:
            try:
                merkle.verify_consistency(old_size, size, proof.hashes, trusted.root_hash, checkpoint.root_hash)
            except merkle.ProofError as exc:
                problems.add(None, f"the service's consistency proof from {old_size} to {size} events does not "
                                   f"verify: {exc}")
    return report


def _logged_as(event: LogEvent, logged: bytes) -> int | None:
    """The neighbouring sequence number under which this event hashes to the leaf hash logged at
    its place, if any: the trace of events renumbered after an insertion or a removal."""
    for seq in (event.seq - 1, event.seq + 1):
        if seq >= 1 and dataclasses.replace(event, seq=seq).leaf_hash() == logged:
            return seq
    return None


def _previous_entry(lines: Iterator[str], seq: int) -> tuple[bytes, bool] | None:
    """The previous export's leaf hash at `seq` and whether that export gave the event in full."""
    line = next(lines, None)
    if line is None:
        return None
    try:
        entry = parse_entry(line)
    except FormatError:
        return None
    if entry.seq != seq:
        return None
    if entry.event is not None:
        return entry.event.leaf_hash(), True
    assert entry.leaf_hash is not None
    return entry.leaf_hash, False


def read_checkpoint(path: Path, verifier: note.Verifier, what: str) -> note.Checkpoint:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise note.NoteError(f"{what} {path}: {exc}") from None
    try:
        return note.open_checkpoint(text, verifier)
    except note.NoteError as exc:
        raise note.NoteError(f"{what} {path}: {exc}") from None


def read_verifier_key(value: str) -> note.Verifier:
    """A verifier key given as is, or the path of a file holding it."""
    text = value
    try:
        is_file = Path(value).is_file()
    except OSError:
        is_file = False
    if is_file or "+" not in value:
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as exc:
            raise note.NoteError(f"verifier key file {value}: {exc}") from None
    return note.Verifier.parse(text.strip())


def verify_files(events: Path, checkpoint: Path, key: str, *, trusted: Path | None = None,
                 proof: Path | None = None, previous: Path | None = None) -> Report:
    """What `entitlement audit verify` does. Raises NoteError (bad key, a checkpoint whose signature
    does not verify) or FormatError (an unreadable proof file) before looking at events."""
    verifier = read_verifier_key(key)
    new = read_checkpoint(checkpoint, verifier, "checkpoint")
    old = read_checkpoint(trusted, verifier, "trusted checkpoint") if trusted is not None else None
    consistency = None
    if proof is not None:
        try:
            consistency = ConsistencyProof.from_json(proof.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(f"consistency proof {proof}: {exc}") from None
    return verify_log(read_lines(events), new, trusted=old, proof=consistency,
                      previous=read_lines(previous) if previous is not None else None)


def leaf_hashes(entries: Sequence[Entry]) -> list[bytes]:
    """The leaf hashes of parsed entries (recomputed for readable events)."""
    out = []
    for e in entries:
        h = e.event.leaf_hash() if e.event is not None else e.leaf_hash
        assert h is not None
        out.append(h)
    return out
