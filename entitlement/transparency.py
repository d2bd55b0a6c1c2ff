"""Use cases of the Merkle event log (AuditService): the signed checkpoint, inclusion and
consistency proofs, and the stream of the log's leaves a funder downloads to verify it offline.

Proofs are over the whole log and are hashes only, so any funder may ask for any of them. The
stream gives a funder the events about the activations it has a share of in full, and every other
leaf as its sequence number and stored leaf hash only: enough to recompute the roots, nothing of
the content.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import and_, select
from sqlalchemy.orm import aliased

from entitlement import logtree, note
from entitlement.app import Context
from entitlement.audit import EventView, funded_programs, readable_event
from entitlement.callers import Caller
from entitlement.errors import FailedPrecondition, InvalidArgument
from entitlement.storage.db import utc
from entitlement.storage.models import Event, LogNode

STREAM_BATCH = 500  # events read per transaction while streaming


@dataclass(frozen=True)
class CheckpointView:
    checkpoint: str
    tree_size: int
    root_hash: bytes
    origin: str
    verifier_key: str


@dataclass(frozen=True)
class InclusionView:
    leaf_index: int
    tree_size: int
    leaf_hash: bytes
    hashes: list[bytes]


@dataclass(frozen=True)
class ConsistencyView:
    old_size: int
    new_size: int
    hashes: list[bytes]


@dataclass(frozen=True)
class EntryView:
    seq: int
    leaf_hash: bytes
    event: EventView | None  # None: the caller may not read it


def _signer(ctx: Context) -> note.Signer:
    if ctx.log_signer is None:
        # (The key's path is in the server's log at start, not in an answer: callers are not told
        # where the server keeps its files.)
        raise FailedPrecondition(
            "this server has no log signing key (ENTITLEMENT_LOG_KEY_FILE): the operator creates it with "
            "`entitlement audit keygen` and restarts the server", reason="LOG_KEY_MISSING")
    return ctx.log_signer


def get_checkpoint(ctx: Context) -> CheckpointView:
    """Sign a checkpoint of the log as it is now. Ed25519 is deterministic: the same size gives the
    same signed text."""
    signer = _signer(ctx)
    with ctx.db.read() as s:
        size = logtree.size(s)
        root = logtree.root(s, size)
    text = note.sign_checkpoint(note.Checkpoint(signer.name, size, root), signer)
    return CheckpointView(text, size, root, signer.name, signer.verifier.encode())


def _not_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise InvalidArgument.single(name, "must not be negative")


def _tree_size(requested: int, log_size: int, field: str) -> int:
    size = requested or log_size
    if size > log_size:
        raise InvalidArgument.single(field, f"is larger than the log, which holds {log_size} events")
    return size


def inclusion_proof(ctx: Context, *, leaf_index: int | None, sequence: int | None, tree_size: int) -> InclusionView:
    if leaf_index is None and sequence is None:
        raise InvalidArgument.single("leaf_index", "give the leaf, by leaf_index or by sequence")
    _not_negative(tree_size=tree_size)
    if leaf_index is not None:
        _not_negative(leaf_index=leaf_index)
        field, index = "leaf_index", leaf_index
    else:
        assert sequence is not None
        if sequence < 1:
            raise InvalidArgument.single("sequence", "sequence numbers start at 1")
        field, index = "sequence", sequence - 1
    with ctx.db.read() as s:
        size = _tree_size(tree_size, logtree.size(s), "tree_size")
        if index >= size:
            raise InvalidArgument.single(field, f"must be below tree_size {size}" if field == "leaf_index"
                                         else f"must be at most tree_size {size}")
        return InclusionView(index, size, logtree.leaf_hash(s, index), logtree.inclusion_proof(s, index, size))


def consistency_proof(ctx: Context, *, old_size: int, new_size: int) -> ConsistencyView:
    _not_negative(old_size=old_size, new_size=new_size)
    with ctx.db.read() as s:
        new = _tree_size(new_size, logtree.size(s), "new_size")
        if old_size > new:
            raise InvalidArgument.single("old_size", f"is larger than new_size {new}")
        return ConsistencyView(old_size, new, logtree.consistency_proof(s, old_size, new))


def stream_entries(ctx: Context, caller: Caller, *, start_sequence: int,
                   tree_size: int) -> Iterator[EntryView]:
    """The leaves start_sequence..tree_size. Arguments are checked at once (before any leaf is
    read); the leaves are then read STREAM_BATCH at a time, each batch in its own transaction."""
    _not_negative(start_sequence=start_sequence, tree_size=tree_size)
    with ctx.db.read() as s:
        end = _tree_size(tree_size, logtree.size(s), "tree_size")
    start = max(start_sequence, 1)
    if start > end + 1:
        raise InvalidArgument.single("start_sequence", f"is beyond tree_size {end} + 1")
    funder = None if caller.role == "admin" else caller.funder_id or ""
    return _entries(ctx, start, end, funder)


def _entries(ctx: Context, start: int, end: int, funder: str | None) -> Iterator[EntryView]:
    """`funder`: None for an admin (every event in full); else the events it may read
    (audit.readable_event) come in full and the others as NULLs from the query itself: their
    content never leaves the database."""
    # Driven by the events table: an event row missing from it (deleted behind the service's back)
    # is missing from the stream, which the verifier reports, rather than hidden as a hash.
    # Each batch is one range of STREAM_BATCH sequence numbers, bounded on both sides of the join:
    # whatever plan PostgreSQL picks, a batch reads that many events (bounded by LIMIT alone, a plan
    # made on statistics that think the tables nearly empty, before any ANALYZE, sorted every event
    # of the log and probed the ledger for each: seconds for 4,000 events, minutes for 20,000;
    # docs/PERFORMANCE-LOG.md, twenty-sixth session).
    node = and_(LogNode.level == 0, LogNode.idx == Event.seq - 1)
    after = start - 1
    while after < end:
        upper = min(end, after + STREAM_BATCH)
        if funder is None:
            q = select(Event.seq, LogNode.hash, Event).outerjoin(LogNode, node)
        else:
            shown = aliased(Event)  # the same row again, joined only where the funder may read it
            readable = and_(shown.seq == Event.seq, shown.seq > after, shown.seq <= upper,
                            readable_event(shown, funder, funded_programs(ctx, funder)))
            q = select(Event.seq, LogNode.hash, shown).outerjoin(LogNode, node).outerjoin(shown, readable)
        batch = q.where(Event.seq > after, Event.seq <= upper).order_by(Event.seq)
        with ctx.db.read() as s:
            rows = s.execute(batch).all()
        after = upper
        for seq, leaf, e in rows:
            leaf_hash = bytes(leaf) if leaf is not None else b""
            if e is not None:
                yield EntryView(seq, leaf_hash, EventView(e.seq, utc(e.time), e.type, e.actor, e.subject,
                                                          e.reason, e.payload_json, e.program_id or "", leaf_hash))
            else:
                yield EntryView(seq, leaf_hash, None)
