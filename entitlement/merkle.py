"""RFC 6962 / RFC 9162 Merkle trees, pure (no I/O): hashes, tree heads, and the inclusion and
consistency proofs, both to produce them and to verify them.

    leaf hash = SHA-256(0x00 || leaf data)          node hash = SHA-256(0x01 || left || right)
    MTH({})   = SHA-256("")                          MTH(D[n]) = node(MTH(D[0:k]), MTH(D[k:n]))
                                                     with k the largest power of two < n

Producing a proof is split in two so that storage stays outside this module: `inclusion_ranges`
and `consistency_ranges` say which sub-ranges [start, end) of the leaves the proof is made of
(each element is MTH of one range), `subtree_nodes` decomposes each range into complete, aligned
power-of-two subtrees `(level, index)` (the subtree of leaves [index * 2**level, (index+1) * 2**level)),
which a store keeps precomputed, and `fold` combines their hashes into the range's MTH. Every range
that occurs in an RFC 6962 proof starts on a multiple of the largest power of two not above its
length, so its decomposition has at most one subtree per level.

Verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2; each failure raises ProofError
saying why. Known-answer tests: tests/test_merkle.py (vectors of transparency-dev/merkle).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

Range = tuple[int, int]  # [start, end) of leaf indexes
Node = tuple[int, int]  # (level, index): leaves [index << level, (index + 1) << level)


class ProofError(ValueError):
    """A proof, or the sizes or hashes given with it, does not verify."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


# ------------------------------------------------------------------------------- tree heads

class CompactRange:
    """The hashes of the complete subtrees covering leaves [0, size), largest first: appending a
    leaf is amortised O(1), the root of the current size O(log n). Used to hash a whole log in
    one pass (the verifier) and to compute the subtree nodes a store keeps."""

    __slots__ = ("size", "_levels", "_hashes")

    def __init__(self) -> None:
        self.size = 0
        self._levels: list[int] = []
        self._hashes: list[bytes] = []

    def append(self, leaf: bytes, on_node: Callable[[int, int, bytes], None] | None = None) -> None:
        """Add one leaf hash. `on_node(level, index, hash)` is told of every complete subtree
        this leaf completes, the leaf itself (level 0) included."""
        index = self.size
        level, h = 0, leaf
        if on_node is not None:
            on_node(0, index, h)
        levels, hashes = self._levels, self._hashes
        while levels and levels[-1] == level:
            levels.pop()
            h = node_hash(hashes.pop(), h)
            level += 1
            if on_node is not None:
                on_node(level, index >> level, h)
        levels.append(level)
        hashes.append(h)
        self.size = index + 1

    def root(self) -> bytes:
        return fold(self._hashes) if self._hashes else EMPTY_ROOT


def root(leaf_hashes: Iterable[bytes]) -> bytes:
    """MTH of a list of leaf hashes."""
    cr = CompactRange()
    for h in leaf_hashes:
        cr.append(h)
    return cr.root()


def fold(hashes: Sequence[bytes]) -> bytes:
    """MTH of a range from the hashes of its `subtree_nodes`, left to right."""
    if not hashes:
        raise ValueError("nothing to fold")
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def subtree_nodes(start: int, end: int) -> list[Node]:
    """The complete aligned subtrees making up [start, end), left to right, for a range as found in
    proofs (start a multiple of the largest power of two <= end - start)."""
    if not 0 <= start < end:
        raise ValueError(f"empty or negative range [{start}, {end})")
    nodes = []
    size = end - start
    for level in range(size.bit_length() - 1, -1, -1):
        width = 1 << level
        if size & width:
            if start % width:
                raise ValueError(f"range [{start}, {end}) is not aligned as in a proof")
            nodes.append((level, start >> level))
            start += width
    return nodes


def head_nodes(size: int) -> list[Node]:
    """The subtrees whose hashes make the tree head of `size` leaves."""
    return subtree_nodes(0, size) if size else []


# ------------------------------------------------------------------------------- proofs (ranges)

def _check_sizes(index: int, size: int) -> None:
    if size < 0 or index < 0:
        raise ValueError("negative index or size")
    if index >= size:
        raise ValueError(f"leaf index {index} is not below the tree size {size}")


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """RFC 6962 PATH(index, D[size]) as leaf ranges, nearest the leaf first."""
    _check_sizes(index, size)
    out: list[Range] = []

    def path(m: int, start: int, n: int) -> None:
        if n == 1:
            return
        k = split(n)
        if m < k:
            path(m, start, k)
            out.append((start + k, start + n))
        else:
            path(m - k, start + k, n - k)
            out.append((start, start + k))

    path(index, 0, size)
    return out


def consistency_ranges(old_size: int, new_size: int) -> list[Range]:
    """RFC 6962 PROOF(old_size, D[new_size]) as leaf ranges. Empty when old_size is 0 or equal to
    new_size."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"old size {old_size} must be between 0 and the new size {new_size}")
    out: list[Range] = []
    if old_size == 0 or old_size == new_size:
        return out

    def subproof(m: int, start: int, n: int, whole: bool) -> None:
        if m == n:
            if not whole:
                out.append((start, start + n))
            return
        k = split(n)
        if m <= k:
            subproof(m, start, k, whole)
            out.append((start + k, start + n))
        else:
            subproof(m - k, start + k, n - k, False)
            out.append((start, start + k))

    subproof(old_size, 0, new_size, True)
    return out


def nodes_for(ranges: Iterable[Range]) -> set[Node]:
    """Every subtree node needed to compute the MTH of these ranges."""
    return {node for r in ranges for node in subtree_nodes(*r)}


def resolve(ranges: Sequence[Range], nodes: Mapping[Node, bytes]) -> list[bytes]:
    """The proof: MTH of each range, from the stored subtree hashes."""
    return [fold([nodes[n] for n in subtree_nodes(*r)]) for r in ranges]


class Tree:
    """An in-memory tree over a list of leaf hashes, every complete subtree kept (tests, tools)."""

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self.nodes: dict[Node, bytes] = {}
        self._range = CompactRange()
        for h in leaf_hashes:
            self.append(h)

    @property
    def size(self) -> int:
        return self._range.size

    def append(self, leaf: bytes) -> None:
        self._range.append(leaf, lambda level, index, h: self.nodes.__setitem__((level, index), h))

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} outside 0..{self.size}")
        return fold([self.nodes[n] for n in head_nodes(size)]) if size else EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return resolve(inclusion_ranges(index, size), self.nodes)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        return resolve(consistency_ranges(old_size, new_size), self.nodes)


# ------------------------------------------------------------------------------- verification

def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """RFC 9162 2.1.3.2: the root that `proof` gives for leaf hash `leaf` at `index` of `size`."""
    if index < 0 or size < 0:
        raise ProofError("negative leaf index or tree size")
    if index >= size:
        raise ProofError(f"leaf index {index} is not below the tree size {size}")
    _check_hash(leaf, "leaf hash")
    for i, p in enumerate(proof):
        _check_hash(p, f"proof[{i}]")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise ProofError("proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("proof is shorter than the tree is deep")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root_hash: bytes) -> None:
    """Raise ProofError unless `proof` proves leaf hash `leaf` at `index` in the tree (size, root)."""
    _check_hash(root_hash, "root hash")
    if root_from_inclusion_proof(index, size, leaf, proof) != root_hash:
        raise ProofError("inclusion proof does not lead to the root hash")


def verify_consistency(old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes,
                       new_root: bytes) -> None:
    """RFC 9162 2.1.4.2: raise ProofError unless `proof` shows the tree (new_size, new_root)
    extends the tree (old_size, old_root) without changing any of its leaves."""
    if old_size < 0 or new_size < 0:
        raise ProofError("negative tree size")
    if old_size > new_size:
        raise ProofError(f"old size {old_size} is larger than the new size {new_size}")
    _check_hash(old_root, "old root hash")
    _check_hash(new_root, "new root hash")
    for i, p in enumerate(proof):
        _check_hash(p, f"proof[{i}]")
    if old_size == new_size:
        if proof:
            raise ProofError("trees of the same size need an empty proof")
        if old_root != new_root:
            raise ProofError("same tree size, different root hashes")
        return
    if old_size == 0:
        if proof:
            raise ProofError("consistency with the empty tree needs an empty proof")
        return
    if not proof:
        raise ProofError("empty consistency proof")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("proof is longer than needed")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("proof is shorter than needed")
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root hash")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root hash")
