"""The event log's Merkle tree in the database (RFC 6962 / 9162), and the key that signs its
checkpoints.

Storage: `log_nodes` (level, idx, hash) holds the hash of every complete, aligned subtree: level 0
the leaf hashes (idx = seq - 1), level l the subtree of leaves [idx * 2**l, (idx + 1) * 2**l).
`add_leaf` writes them in the transaction that logs the event (eventlog.append): the leaf, and the
subtrees it completes, hashed from their left halves, which it reads in at most one query (the
leaf completes no subtree half of the time, one a quarter of the time, ...). About two rows per
event; the database refuses UPDATE and DELETE on them as on the events.

Reading never walks the leaves: a tree head is the fold of at most one stored subtree per set bit
of the size; each element of an inclusion or consistency proof is one stored subtree, or the fold
of O(log n) of them for a range ending at the tree size; all are fetched in one query. Costs are
O(log n) rows whatever the log's size (measured in BENCHMARKS.md, section "audit").

Appends are serialised by the `log_head` row (eventlog.append), so the left halves a new leaf needs
are committed (or written earlier in the same transaction) when it reads them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import structlog
from sqlalchemy import Select, and_, bindparam, insert, or_, select
from sqlalchemy.orm import Session

from entitlement import keyfiles, merkle, note
from entitlement.storage import direct
from entitlement.storage.models import LogHead, LogNode

log = structlog.get_logger(__name__)

DEFAULT_ORIGIN = "entitlement.local/audit-log"
_FETCH_CHUNK = 200


class DamagedLog(RuntimeError):
    """A node the tree needs is not stored: the log was damaged behind the service's back."""


# ---------------------------------------------------------------------------------------- writing

def _trailing_ones(n: int) -> int:
    return (~n & (n + 1)).bit_length() - 1


_INSERT_NODES = insert(LogNode)
# The left halves a leaf's new subtrees need: one statement per number of subtrees it closes, built
# once (about 40 at most), so the write path never builds a query.
_LEFT_HALVES: dict[int, Select[tuple[int, int, bytes]]] = {}


def _left_halves(session: Session, index: int, closes: int) -> dict[merkle.Node, bytes]:
    stmt = _LEFT_HALVES.get(closes)
    if stmt is None:
        stmt = _LEFT_HALVES[closes] = select(LogNode.level, LogNode.idx, LogNode.hash).where(
            or_(*(and_(LogNode.level == level, LogNode.idx == bindparam(f"idx{level}")) for level in range(closes))))
    rows = direct.of(session).all(stmt, {f"idx{level}": (index >> level) - 1 for level in range(closes)})
    found = {(int(level), int(idx)): bytes(h) for level, idx, h in rows}
    _check_found([(level, (index >> level) - 1) for level in range(closes)], found)
    return found


def add_leaf(session: Session, index: int, leaf_hash: bytes) -> None:
    """Store leaf `index` (seq - 1) and the complete subtrees it closes. Call in the transaction
    that wrote the event, after taking its sequence number."""
    closes = _trailing_ones(index)  # subtrees of 2, 4, ... leaves ending with this leaf
    left = _left_halves(session, index, closes) if closes else {}
    rows = [{"level": 0, "idx": index, "hash": leaf_hash}]
    h = leaf_hash
    for level in range(closes):
        h = merkle.node_hash(left[(level, (index >> level) - 1)], h)
        rows.append({"level": level + 1, "idx": index >> (level + 1), "hash": h})
    direct.of(session).execute_many(_INSERT_NODES, rows)


# ---------------------------------------------------------------------------------------- reading

def size(session: Session) -> int:
    """The log's size: events logged and committed (the tree covers exactly these)."""
    return int(session.execute(select(LogHead.size).where(LogHead.id == 1)).scalar_one())


def fetch(session: Session, nodes: Iterable[merkle.Node]) -> dict[merkle.Node, bytes]:
    wanted = sorted(set(nodes))
    found: dict[merkle.Node, bytes] = {}
    for start in range(0, len(wanted), _FETCH_CHUNK):
        by_level: dict[int, list[int]] = defaultdict(list)
        for level, idx in wanted[start:start + _FETCH_CHUNK]:
            by_level[level].append(idx)
        condition = or_(*(and_(LogNode.level == level, LogNode.idx.in_(idxs)) for level, idxs in by_level.items()))
        for level, idx, h in session.execute(select(LogNode.level, LogNode.idx, LogNode.hash).where(condition)):
            found[(int(level), int(idx))] = bytes(h)
    _check_found(wanted, found)
    return found


def _check_found(wanted: list[merkle.Node], found: dict[merkle.Node, bytes]) -> None:
    missing = [n for n in wanted if n not in found]
    if missing:
        level, idx = missing[0]
        raise DamagedLog(f"the event log's Merkle tree has no node (level {level}, index {idx}): log_nodes was "
                         f"damaged outside the service")


def root(session: Session, tree_size: int) -> bytes:
    if tree_size == 0:
        return merkle.EMPTY_ROOT
    nodes = merkle.head_nodes(tree_size)
    stored = fetch(session, nodes)
    return merkle.fold([stored[n] for n in nodes])


def _resolve(session: Session, ranges: list[merkle.Range]) -> list[bytes]:
    return merkle.resolve(ranges, fetch(session, merkle.nodes_for(ranges)))


def leaf_hash(session: Session, index: int) -> bytes:
    return fetch(session, [(0, index)])[(0, index)]


def inclusion_proof(session: Session, index: int, tree_size: int) -> list[bytes]:
    return _resolve(session, merkle.inclusion_ranges(index, tree_size))


def consistency_proof(session: Session, old_size: int, new_size: int) -> list[bytes]:
    return _resolve(session, merkle.consistency_ranges(old_size, new_size))


# ---------------------------------------------------------------------------------------- signing key

def create_key_file(path: Path) -> None:
    """A new Ed25519 key, PKCS#8 PEM, mode 0600; refuses to replace an existing one (a new key
    means funders must be told the new verifier key)."""
    keyfiles.create_private(path, keyfiles.new_pem())


def read_signer(path: Path, origin: str) -> note.Signer:
    """The checkpoint signer: the key of `path` under the name `origin`. SystemExit with the fix
    when the origin or the file is unusable."""
    if not note.valid_name(origin):
        raise SystemExit(f"ENTITLEMENT_LOG_ORIGIN {origin!r}: a log origin is non-empty, without spaces or '+' "
                         f"(e.g. {DEFAULT_ORIGIN})")
    try:
        key = keyfiles.load_ed25519(path)
    except ValueError as exc:
        raise SystemExit(f"log key file {path}: {exc}") from None
    return note.Signer(origin, key)


def load_signer(path: Path, origin: str, *, create: bool = False) -> note.Signer | None:
    """The signer, creating the key when missing with create=True (demo, tests). Without it, a
    missing key is None: the server runs, and GetCheckpoint says how to make one."""
    if not path.exists():
        if not create:
            log.warning("no log signing key: GetCheckpoint is refused until one is made with "
                        "`entitlement audit keygen` and the server restarted", path=str(path))
            return None
        try:
            create_key_file(path)
        except FileExistsError:
            pass  # made by another process meanwhile
    return read_signer(path, origin)
