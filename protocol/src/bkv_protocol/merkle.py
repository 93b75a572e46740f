"""A compact sparse Merkle trie over 32-byte keys (Diem/Aptos ``SparseMerkleProof`` style).

Why: the hsm-proxy must enforce the guess limit even if etcd and the islands
roll back or fork records. Each island's authenticated log entry carries the
root of this trie over the island's records; every state change brings the
record and a proof against the newest root, and the HSM side (which keeps only
the root) verifies it, applies the change and computes the next root. The
untrusted side (islands) keeps the whole trie (``Trie``) to produce proofs.

Stdlib only: this module is meant to move into a protocol package later.

Definitions
-----------
- Keys are 32-byte user refs; values are 32-byte value hashes (the caller
  hashes the record entry). Key bit ``i`` is bit ``i`` of the key counted from
  the most significant bit of byte 0. Depth 0 is the root.
- ``PLACEHOLDER`` = 32 zero bytes = the hash of an empty subtree.
- ``leaf(key, vh) = SHA-256(canonical(LEAF_LABEL, key, vh))`` and
  ``internal(l, r) = SHA-256(canonical(NODE_LABEL, l, r))`` with
  ``canonical(label, *fields) = u32be(len(label)) || label || (u32be(len(f)) || f)*``.
- A subtree with no leaf hashes to ``PLACEHOLDER``; with exactly one leaf, to
  that leaf's hash (the leaf sits at the highest level where it is alone, so
  its hash does not depend on its depth); with two or more, to
  ``internal(left child's hash, right child's hash)``, either child possibly
  ``PLACEHOLDER``. The empty trie's root is ``PLACEHOLDER``. The shape is thus
  a function of the key set alone: one root per (key -> value hash) map.
- A ``Proof`` for ``key`` lists the siblings from the root downwards
  (``siblings[i]`` is the child of the depth-``i`` path node on the side the
  key does not take) and the terminal where the key's path ends: a leaf
  ``(key', vh')`` or ``None`` for an empty subtree. ``key' == key`` proves
  inclusion; anything else proves absence.

Verification and what it needs for soundness
--------------------------------------------
``verify`` folds the terminal (``leaf(key', vh')`` or ``PLACEHOLDER``) upward
through the siblings, choosing left/right by *the queried key's* bits, and
compares with the trusted root. As in the Diem verifier it also requires at
most 256 siblings and, for an absence proof ending at another key's leaf, that
``key'`` shares the first ``len(siblings)`` bits with ``key``.

Soundness rests on SHA-256 collision resistance and on leaf/node domain
separation (the labels): a fold that matches the root pins every hash on the
path to the real trie's node at that position, and the terminal to the real
subtree at depth ``len(siblings)`` on the key's path. That subtree is then
either empty or exactly one leaf, so the key is absent or has that value. The
trusted roots are always canonical (they start at ``PLACEHOLDER`` and change
only via ``updated_root*``, which keep the trie canonical), so the
common-prefix rule and the placement checks below are already implied by
collision resistance for an honest root; we still check them because they are
cheap, give a clear error instead of relying on a hash argument, and make the
insert arithmetic in ``updated_root`` well defined for any input. The checks
we add beyond Diem's (Diem's verifier accepts such proofs and lets the root
comparison fail): a terminal (leaf or empty) whose bottom sibling is
``PLACEHOLDER`` is non-canonical -- the leaf would sit one level higher, and
``internal(PLACEHOLDER, PLACEHOLDER)`` never occurs. What cannot be checked
locally (e.g. an empty terminal beside a sibling that is a lone leaf) is left
to the root comparison.

No deletion: records are never deleted (they become tombstones, i.e. a new
value hash), so the trie only ever inserts or updates.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable

from bkv_protocol import labels
from bkv_protocol.encoding import canonical

__all__ = [
    "LEAF_LABEL", "NODE_LABEL", "PLACEHOLDER", "MAX_DEPTH", "ProofInvalid", "Proof", "Trie",
    "canonical", "leaf_hash", "node_hash", "verify", "updated_root", "updated_root_many",
]

LEAF_LABEL = labels.TRIE_LEAF
NODE_LABEL = labels.TRIE_NODE
PLACEHOLDER = bytes(32)
MAX_DEPTH = 256


class ProofInvalid(ValueError):
    """The proof does not authenticate the claim against the given root."""


# canonical(label, a, b) for 32-byte a and b, precomputed: hashing is the hot path.
_L32 = struct.pack(">I", 32)
_LEAF_PREFIX = struct.pack(">I", len(LEAF_LABEL)) + LEAF_LABEL + _L32
_NODE_PREFIX = struct.pack(">I", len(NODE_LABEL)) + NODE_LABEL + _L32
_sha256 = hashlib.sha256


def leaf_hash(key: bytes, vh: bytes) -> bytes:
    return _sha256(_LEAF_PREFIX + key + _L32 + vh).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(_NODE_PREFIX + left + _L32 + right).digest()


def _check32(value: object, what: str) -> None:
    if type(value) is not bytes or len(value) != 32:
        raise ValueError(f"{what} must be 32 bytes")


def _int(key: bytes) -> int:
    return int.from_bytes(key, "big")


def _bit(k: int, i: int) -> int:
    return (k >> (255 - i)) & 1


def _common_prefix(a: int, b: int) -> int:
    """Number of leading bits two keys share (256 if equal)."""
    return 256 - (a ^ b).bit_length()


@dataclass(frozen=True, slots=True)
class Proof:
    siblings: tuple[bytes, ...]
    leaf: tuple[bytes, bytes] | None = None

    def __post_init__(self) -> None:
        if type(self.siblings) is not tuple or len(self.siblings) > MAX_DEPTH:
            raise ValueError(f"siblings must be a tuple of at most {MAX_DEPTH} hashes")
        for s in self.siblings:
            _check32(s, "sibling")
        if self.leaf is not None:
            if type(self.leaf) is not tuple or len(self.leaf) != 2:
                raise ValueError("leaf must be a (key, value hash) tuple or None")
            _check32(self.leaf[0], "leaf key")
            _check32(self.leaf[1], "leaf value hash")

    # Wire form: u8 flags (bit 0: has leaf; others zero) | u16be n |
    # bitmap of ceil(n/8) bytes, bit i (MSB first) set iff siblings[i] is not
    # PLACEHOLDER, unused bits zero | the set siblings, 32 bytes each |
    # leaf key || leaf value hash if flagged. One encoding per proof.
    def to_bytes(self) -> bytes:
        n = len(self.siblings)
        bitmap = bytearray((n + 7) // 8)
        body = []
        for i, s in enumerate(self.siblings):
            if s != PLACEHOLDER:
                bitmap[i >> 3] |= 0x80 >> (i & 7)
                body.append(s)
        leaf = b"" if self.leaf is None else self.leaf[0] + self.leaf[1]
        return struct.pack(">BH", 0 if self.leaf is None else 1, n) + bytes(bitmap) + b"".join(body) + leaf

    @classmethod
    def from_bytes(cls, data: bytes) -> Proof:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError("proof must be bytes")
        data = bytes(data)
        if len(data) < 3:
            raise ValueError("proof too short")
        flags, n = struct.unpack_from(">BH", data)
        if flags > 1:
            raise ValueError("unknown proof flags")
        if n > MAX_DEPTH:
            raise ValueError(f"more than {MAX_DEPTH} siblings")
        nb = (n + 7) // 8
        bitmap = data[3:3 + nb]
        if len(bitmap) != nb:
            raise ValueError("proof truncated in the bitmap")
        if n % 8 and bitmap[-1] & (0xFF >> (n % 8)):
            raise ValueError("bitmap padding bits set")
        present = [bool(bitmap[i >> 3] & (0x80 >> (i & 7))) for i in range(n)]
        expected = 3 + nb + 32 * sum(present) + 64 * flags
        if len(data) != expected:
            raise ValueError(f"proof is {len(data)} bytes, its header says {expected}")
        pos = 3 + nb
        siblings = []
        for p in present:
            if p:
                s = data[pos:pos + 32]
                pos += 32
                if s == PLACEHOLDER:
                    raise ValueError("placeholder sibling encoded explicitly")
                siblings.append(s)
            else:
                siblings.append(PLACEHOLDER)
        leaf = (data[pos:pos + 32], data[pos + 32:pos + 64]) if flags else None
        return cls(tuple(siblings), leaf)


def _fold(h: bytes, k: int, siblings: tuple[bytes, ...]) -> bytes:
    for i in range(len(siblings) - 1, -1, -1):
        s = siblings[i]
        h = node_hash(s, h) if (k >> (255 - i)) & 1 else node_hash(h, s)
    return h


def _check(root: bytes, key: bytes, k: int, proof: Proof) -> bytes | None:
    """All of verify except argument checks; returns the found value hash."""
    sibs = proof.siblings
    if sibs and sibs[-1] == PLACEHOLDER:
        raise ProofInvalid("non-canonical proof: its terminal sits beside an empty subtree")
    if proof.leaf is None:
        terminal, found = PLACEHOLDER, None
    else:
        lk, lv = proof.leaf
        terminal = leaf_hash(lk, lv)
        if lk == key:
            found = lv
        elif _common_prefix(k, _int(lk)) < len(sibs):
            raise ProofInvalid("the proof's leaf is not on the key's path")
        else:
            found = None
    if _fold(terminal, k, sibs) != root:
        raise ProofInvalid("proof does not match the root")
    return found


def _args(root: bytes, key: bytes, proof: Proof) -> int:
    _check32(root, "root")
    _check32(key, "key")
    if not isinstance(proof, Proof):
        raise ValueError("proof must be a Proof")
    return _int(key)


def verify(root: bytes, key: bytes, proof: Proof) -> bytes | None:
    """The value hash stored for ``key`` under ``root``, or None if the proof
    shows it absent. Raises ``ProofInvalid`` if the proof does not hold."""
    return _check(root, key, _args(root, key, proof), proof)


def updated_root(root: bytes, key: bytes, proof: Proof, new_vh: bytes) -> bytes:
    """Verify ``proof``, then return the root after setting ``key`` to ``new_vh``."""
    k = _args(root, key, proof)
    _check32(new_vh, "value hash")
    _check(root, key, k, proof)
    sibs = proof.siblings
    if proof.leaf is not None and proof.leaf[0] != key:
        # Insert beside another key's leaf: both move down to the first bit
        # where they differ, with empty subtrees beside the path until there.
        lk, lv = proof.leaf
        c = _common_prefix(k, _int(lk))
        sibs = sibs + (PLACEHOLDER,) * (c - len(sibs)) + (leaf_hash(lk, lv),)
    return _fold(leaf_hash(key, new_vh), k, sibs)


# The batch works on a partial trie built from the proofs. Nodes: a list
# [left, right] (internal, opened), bytes (a subtree known only by its hash,
# PLACEHOLDER when empty) or a tuple (key, vh) (a leaf).

def updated_root_many(root: bytes, items: Iterable[tuple[bytes, Proof, bytes]]) -> bytes:
    """Apply several updates whose proofs are all against ``root`` (distinct
    keys) and return the resulting root: the same as applying them one by one."""
    _check32(root, "root")
    items = list(items)
    if not items:
        return root
    box: list = [None]
    seen: set[bytes] = set()
    for key, proof, new_vh in items:
        k = _args(root, key, proof)
        _check32(new_vh, "value hash")
        if key in seen:
            raise ValueError("duplicate key in batch")
        seen.add(key)
        _check(root, key, k, proof)
        _graft(box, k, proof)
    # Each proof matched the root, so (barring collisions) they agree; check the
    # assembled partial trie anyway so a grafting mistake can never go unnoticed.
    if _hash_partial(box[0]) != root:
        raise ProofInvalid("proofs disagree about the trie")
    for key, _, new_vh in items:
        _insert_partial(box, key, _int(key), new_vh)
    return _hash_partial(box[0])


def _graft(box: list, k: int, proof: Proof) -> None:
    cont, idx = box, 0
    for i, sib in enumerate(proof.siblings):
        node = cont[idx]
        if type(node) is not list:  # unknown, or so far only another proof's sibling hash
            node = cont[idx] = [None, None]
            # (its hash is then re-checked by the whole-trie comparison)
        side = _bit(k, i)
        if node[1 - side] is None:
            node[1 - side] = sib
        cont, idx = node, side
    terminal = proof.leaf if proof.leaf is not None else PLACEHOLDER
    node = cont[idx]
    if type(node) is list or (type(node) is tuple and node != terminal):
        raise ProofInvalid("proofs disagree about the trie")
    cont[idx] = terminal


def _insert_partial(box: list, key: bytes, k: int, vh: bytes) -> None:
    cont, idx, depth = box, 0, 0
    while type(node := cont[idx]) is list:
        cont, idx, depth = node, _bit(k, depth), depth + 1
    if type(node) is bytes and node != PLACEHOLDER:
        raise AssertionError("key path not opened by its proof")
    if node == PLACEHOLDER or node[0] == key:
        cont[idx] = (key, vh)
        return
    c = _common_prefix(k, _int(node[0]))
    for i in range(depth, c):
        n = [PLACEHOLDER, PLACEHOLDER]
        cont[idx] = n
        cont, idx = n, _bit(k, i)
    n = [node, node]
    n[_bit(k, c)] = (key, vh)
    cont[idx] = n


def _hash_partial(node: object) -> bytes:
    t = type(node)
    if t is bytes:
        return node
    if t is tuple:
        return leaf_hash(*node)
    if t is list:
        return node_hash(_hash_partial(node[0]), _hash_partial(node[1]))
    raise AssertionError("incomplete partial trie")


# --- the untrusted side's full trie -----------------------------------------

class _Leaf:
    __slots__ = ("key", "vh", "h")

    def __init__(self, key: bytes, vh: bytes) -> None:
        self.key, self.vh, self.h = key, vh, leaf_hash(key, vh)


class _Branch:
    """Where keys below first differ: at bit ``bit`` (so both kids are
    non-empty). ``rep`` is any key below, for the shared prefix. ``h`` is the
    hash at depth ``bit`` (None = stale); ``lift_h`` caches it lifted through
    the empty levels above to depth ``lift_d``."""
    __slots__ = ("bit", "rep", "kids", "h", "lift_d", "lift_h")

    def __init__(self, bit: int, rep: bytes, kids: list) -> None:
        self.bit, self.rep, self.kids = bit, rep, kids
        self.h, self.lift_d, self.lift_h = None, -1, b""


def _branch(c: int, k: int, new: _Leaf, other: object) -> _Branch:
    return _Branch(c, new.key, [other, new] if _bit(k, c) else [new, other])


class Trie:
    """The full trie, compressed (Patricia): a node only where keys diverge,
    each leaf at the top of its unique prefix. Hashes are computed lazily and
    cached; ``set`` invalidates only the O(depth) nodes on its path."""

    __slots__ = ("_box", "_n", "_root")

    def __init__(self) -> None:
        self._box: list = [None]
        self._n = 0
        self._root: bytes | None = PLACEHOLDER

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"Trie({self._n} keys)"

    def get(self, key: bytes) -> bytes | None:
        _check32(key, "key")
        k, node = _int(key), self._box[0]
        while type(node) is _Branch:
            node = node.kids[_bit(k, node.bit)]
        return node.vh if node is not None and node.key == key else None

    def set(self, key: bytes, vh: bytes) -> None:
        _check32(key, "key")
        _check32(vh, "value hash")
        k = _int(key)
        cont, idx, path = self._box, 0, []
        while True:
            node = cont[idx]
            if node is None:
                cont[idx] = _Leaf(key, vh)
                self._n += 1
                break
            if type(node) is _Leaf:
                if node.key == key:
                    cont[idx] = _Leaf(key, vh)
                else:
                    cont[idx] = _branch(_common_prefix(k, _int(node.key)), k, _Leaf(key, vh), node)
                    self._n += 1
                break
            c = _common_prefix(k, _int(node.rep))
            if c < node.bit:  # the key leaves this branch's prefix above it
                cont[idx] = _branch(c, k, _Leaf(key, vh), node)
                self._n += 1
                break
            path.append(node)
            cont, idx = node.kids, _bit(k, node.bit)
        for b in path:
            b.h, b.lift_d = None, -1
        self._root = None

    def root(self) -> bytes:
        if self._root is None:
            self._root = self._edge(self._box[0], 0)
        return self._root

    def prove(self, key: bytes) -> Proof:
        _check32(key, "key")
        k, node, depth, sibs = _int(key), self._box[0], 0, []
        while type(node) is _Branch:
            c = _common_prefix(k, _int(node.rep))
            if c < node.bit:  # the key's path leaves the branch's prefix: empty there
                sibs += [PLACEHOLDER] * (c - depth)
                sibs.append(self._edge(node, c + 1))
                return Proof(tuple(sibs), None)
            side = _bit(k, node.bit)
            sibs += [PLACEHOLDER] * (node.bit - depth)
            sibs.append(self._edge(node.kids[1 - side], node.bit + 1))
            depth, node = node.bit + 1, node.kids[side]
        return Proof(tuple(sibs), None if node is None else (node.key, node.vh))

    def _edge(self, node: object, depth: int) -> bytes:
        """Hash of the subtree at ``depth`` whose only content is ``node``."""
        if node is None:
            return PLACEHOLDER
        if type(node) is _Leaf:
            return node.h
        if node.h is not None and node.lift_d == depth:
            return node.lift_h
        if node.h is None:
            below = node.bit + 1
            node.h = node_hash(self._edge(node.kids[0], below), self._edge(node.kids[1], below))
        h, k = node.h, _int(node.rep)
        for i in range(node.bit - 1, depth - 1, -1):
            h = node_hash(PLACEHOLDER, h) if _bit(k, i) else node_hash(h, PLACEHOLDER)
        node.lift_d, node.lift_h = depth, h
        return h
