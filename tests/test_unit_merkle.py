"""Unit tests of the sparse Merkle trie (protocol/src/bkv_protocol/merkle.py), against a
naive reference written here from the module's definitions."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings, strategies as st

from bkv_protocol import labels, merkle
from bkv_protocol.encoding import canonical
from bkv_protocol.merkle import (
    PLACEHOLDER, Proof, ProofInvalid, Trie, updated_root, updated_root_many, verify,
)

# --- the reference: recursive over a sorted dict, straight from the definitions


def ref_leaf(key: bytes, vh: bytes) -> bytes:
    return hashlib.sha256(canonical(b"bkv/v1/hash/trie-leaf", key, vh)).digest()


def ref_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(canonical(b"bkv/v1/hash/trie-node", left, right)).digest()


def bit(key: bytes, i: int) -> int:
    return (key[i // 8] >> (7 - i % 8)) & 1


def ref_hash(items: list[tuple[bytes, bytes]], depth: int = 0) -> bytes:
    if not items:
        return PLACEHOLDER
    if len(items) == 1:
        return ref_leaf(*items[0])
    return ref_node(ref_hash([kv for kv in items if not bit(kv[0], depth)], depth + 1),
                    ref_hash([kv for kv in items if bit(kv[0], depth)], depth + 1))


def ref_root(d: dict[bytes, bytes]) -> bytes:
    return ref_hash(sorted(d.items()))


def ref_proof(d: dict[bytes, bytes], key: bytes) -> Proof:
    items, sibs, depth = sorted(d.items()), [], 0
    while len(items) > 1:
        side = bit(key, depth)
        sibs.append(ref_hash([kv for kv in items if bit(kv[0], depth) != side], depth + 1))
        items = [kv for kv in items if bit(kv[0], depth) == side]
        depth += 1
    return Proof(tuple(sibs), items[0] if items else None)


def keys(rng: random.Random, n: int) -> list[bytes]:
    """Random keys, half of them near-copies of a few bases (long shared
    prefixes: the compressed trie's gaps and deep splits)."""
    bases = [rng.randbytes(32) for _ in range(3)]
    out: dict[bytes, None] = {}  # insertion-ordered, unlike a set: reproducible
    while len(out) < n:
        if rng.random() < 0.5:
            out[rng.randbytes(32)] = None
        else:
            k = bytearray(rng.choice(bases))
            for _ in range(rng.randrange(1, 3)):
                i = rng.randrange(256)
                k[i // 8] ^= 0x80 >> (i % 8)
            out[bytes(k)] = None
    return sorted(out, key=lambda _: rng.random())


def vh(rng: random.Random) -> bytes:
    return rng.randbytes(32)


def build(d: dict[bytes, bytes]) -> Trie:
    t = Trie()
    for k, v in d.items():
        t.set(k, v)
    return t


SEEDS = range(6)


# --- definitions


def test_the_hash_helpers_match_the_canonical_encoding_of_the_project():
    k, v = b"\x01" * 32, b"\x02" * 32
    assert merkle.leaf_hash(k, v) == ref_leaf(k, v)
    assert merkle.node_hash(k, v) == ref_node(k, v)
    assert merkle.canonical(b"l", b"ab", b"") == canonical(b"l", b"ab", b"")
    others = [v for n, v in vars(labels).items() if n.isupper() and n not in ("TRIE_LEAF", "TRIE_NODE")]
    assert {merkle.LEAF_LABEL, merkle.NODE_LABEL}.isdisjoint(others) and merkle.LEAF_LABEL != merkle.NODE_LABEL


def test_the_empty_trie_has_the_placeholder_root_and_proves_every_key_absent():
    t = Trie()
    assert t.root() == PLACEHOLDER and len(t) == 0 and t.get(b"\x05" * 32) is None
    p = t.prove(b"\x05" * 32)
    assert p == Proof((), None)
    assert verify(PLACEHOLDER, b"\x05" * 32, p) is None


def test_a_single_key_trie_is_rooted_at_that_keys_leaf():
    k, v = b"\x80" + bytes(31), b"\x11" * 32
    t = build({k: v})
    assert t.root() == ref_leaf(k, v)
    assert verify(t.root(), k, t.prove(k)) == v
    other = b"\x00" * 32
    assert t.prove(other) == Proof((), (k, v)) and verify(t.root(), other, t.prove(other)) is None


@pytest.mark.parametrize("seed", SEEDS)
def test_the_trie_root_and_proofs_equal_the_reference_for_random_key_sets(seed):
    rng = random.Random(seed)
    ks = keys(rng, 200)
    d = {k: vh(rng) for k in ks[:150]}
    t = build(d)
    assert len(t) == 150 and t.root() == ref_root(d)
    for k in ks[100:]:  # 50 present, 50 absent
        assert t.prove(k) == ref_proof(d, k)
        assert t.get(k) == d.get(k)
        assert verify(t.root(), k, t.prove(k)) == d.get(k)


@pytest.mark.parametrize("seed", SEEDS)
def test_inserts_and_updates_through_proofs_give_the_reference_root(seed):
    rng = random.Random(seed)
    ks = keys(rng, 120)
    d: dict[bytes, bytes] = {}
    t, root = Trie(), PLACEHOLDER
    for _ in range(300):
        k, v = rng.choice(ks), vh(rng)  # about half of them updates
        root = updated_root(root, k, t.prove(k), v)
        t.set(k, v)
        d[k] = v
        assert root == t.root()
    assert root == ref_root(d)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_batch_of_updates_equals_applying_them_one_by_one(seed):
    rng = random.Random(seed)
    ks = keys(rng, 160)
    d = {k: vh(rng) for k in ks[:100]}
    t = build(d)
    root = t.root()
    for size in (1, 2, 7, 40):
        # a mix of updates of present keys and inserts, some sharing long prefixes
        batch = [(k, t.prove(k), vh(rng)) for k in rng.sample(ks, size)]
        new = updated_root_many(root, batch)
        seq = root
        for k, _, v in batch:
            seq = updated_root(seq, k, ref_proof(d, k), v)  # proof against the running root
            d[k] = v
        assert new == seq == ref_root(d)
        for k, _, v in batch:
            t.set(k, v)
        root = t.root()
        assert root == new


def test_a_batch_of_inserts_beside_the_same_leaf_splits_it_correctly():
    # Three new keys whose proofs all end at the same (only) leaf.
    a = bytes(32)
    b, c, e = (bytes([0]) * 31 + bytes([x]) for x in (1, 2, 3))
    t = build({a: b"\x01" * 32})
    root = t.root()
    batch = [(k, t.prove(k), k) for k in (b, c, e)]
    assert updated_root_many(root, batch) == ref_root({a: b"\x01" * 32, b: b, c: c, e: e})
    assert updated_root_many(root, []) == root


def test_a_batch_refuses_duplicate_keys_and_a_proof_against_another_root():
    rng = random.Random(7)
    d = {k: vh(rng) for k in keys(rng, 30)}
    t = build(d)
    k = next(iter(d))
    with pytest.raises(ValueError):
        updated_root_many(t.root(), [(k, t.prove(k), vh(rng)), (k, t.prove(k), vh(rng))])
    old = t.root()
    other = rng.randbytes(32)
    t.set(other, vh(rng))
    with pytest.raises(ProofInvalid):
        updated_root_many(old, [(k, ref_proof(d, k), vh(rng)), (other, t.prove(other), vh(rng))])


# --- tampering


def _trie_and_keys(seed: int, n: int = 300):
    rng = random.Random(seed)
    ks = keys(rng, n + 50)
    d = {k: vh(rng) for k in ks[:n]}
    return rng, build(d), d, ks


@pytest.mark.parametrize("seed", SEEDS)
def test_changing_any_sibling_the_leaf_or_the_root_breaks_the_proof(seed):
    rng, t, d, ks = _trie_and_keys(seed)
    root = t.root()
    for k in rng.sample(ks, 40):
        p = t.prove(k)
        for i in range(len(p.siblings)):
            for s in (rng.randbytes(32), PLACEHOLDER):
                if s == p.siblings[i]:
                    continue
                bad = Proof(p.siblings[:i] + (s,) + p.siblings[i + 1:], p.leaf)
                with pytest.raises(ProofInvalid):
                    verify(root, k, bad)
        if p.leaf is not None:
            lk, lv = p.leaf
            for leaf in ((lk, rng.randbytes(32)), (rng.randbytes(32), lv), None):
                with pytest.raises(ProofInvalid):
                    verify(root, k, Proof(p.siblings, leaf))
        with pytest.raises(ProofInvalid):
            verify(rng.randbytes(32), k, p)
        with pytest.raises(ProofInvalid):
            updated_root(rng.randbytes(32), k, p, vh(rng))


@pytest.mark.parametrize("seed", SEEDS)
def test_a_proof_for_one_key_does_not_verify_for_another(seed):
    rng, t, d, ks = _trie_and_keys(seed)
    root = t.root()
    present = list(d)
    for _ in range(100):
        k1, k2 = rng.sample(ks, 2)
        p1 = t.prove(k1)
        try:
            got = verify(root, k2, p1)
        except ProofInvalid:
            continue
        # Only sound reuse: the same empty subtree or leaf ends both paths, so
        # the proof shows k2 absent, or (k1 absent beside it) k2's own leaf.
        assert got == d.get(k2) and k1 not in d
    for k in present[:50]:
        with pytest.raises(ProofInvalid):
            verify(root, k, t.prove(bytes(x ^ 0xFF for x in k)))


@pytest.mark.parametrize("seed", SEEDS)
def test_an_absence_proof_for_a_present_key_cannot_be_built(seed):
    rng, t, d, ks = _trie_and_keys(seed)
    root = t.root()
    absent = [k for k in ks if k not in d]
    for k in rng.sample(list(d), 40):
        p = t.prove(k)
        attempts = []
        for cut in range(len(p.siblings)):  # truncate: end higher, at an empty terminal or another leaf
            attempts.append(Proof(p.siblings[:cut], None))
            attempts += [Proof(p.siblings[:cut], (o, d[o])) for o in rng.sample(list(d), 3) if o != k]
        for o in rng.sample(list(d), 10):  # swap in another key's leaf (and its whole proof)
            if o != k:
                attempts.append(Proof(p.siblings, (o, d[o])))
                attempts.append(t.prove(o))
        attempts.append(Proof(p.siblings, None))
        attempts += [t.prove(a) for a in absent[:10]]
        for bad in attempts:
            # (an absent key's proof may end at k's own leaf: then it proves k's value)
            try:
                got = verify(root, k, bad)
            except ProofInvalid:
                continue
            assert got == d[k] and bad.leaf == (k, d[k])


def test_a_proof_against_an_old_root_does_not_verify_against_the_new_one():
    rng, t, d, ks = _trie_and_keys(3)
    k = next(iter(d))
    old_proof, old_root = t.prove(k), t.root()
    t.set(k, vh(rng))
    assert verify(old_root, k, old_proof) == d[k]
    with pytest.raises(ProofInvalid):
        verify(t.root(), k, old_proof)
    # and an unrelated insert elsewhere also moves the root away from every old proof
    k2 = next(x for x in ks if x not in d)
    p_before, root_before = t.prove(k2), t.root()
    t.set(rng.randbytes(32), vh(rng))
    assert t.root() != root_before
    for key, proof in ((k, old_proof), (k2, p_before)):
        with pytest.raises(ProofInvalid):
            verify(t.root(), key, proof)


def test_non_canonical_proofs_are_refused_even_where_the_root_would_match():
    # One leaf pushed below its canonical place: only PLACEHOLDER beside it.
    k, v = bytes(32), b"\x07" * 32
    root = ref_leaf(k, v)
    pushed = Proof((PLACEHOLDER,), (k, v))
    with pytest.raises(ProofInvalid, match="non-canonical"):
        verify(ref_node(root, PLACEHOLDER), k, pushed)
    with pytest.raises(ProofInvalid, match="non-canonical"):
        verify(ref_node(PLACEHOLDER, PLACEHOLDER), k, Proof((PLACEHOLDER,), None))
    # A leaf elsewhere cannot prove absence of a key off its prefix.
    other = b"\x80" + bytes(31)
    root2 = ref_root({k: v, other: v})
    with pytest.raises(ProofInvalid, match="not on the key's path"):
        verify(root2, b"\x80" + bytes(30) + b"\x01", Proof((ref_leaf(other, v),), (k, v)))


# --- wire form


@pytest.mark.parametrize("seed", SEEDS)
def test_proofs_round_trip_through_the_compact_wire_form(seed):
    rng, t, d, ks = _trie_and_keys(seed)
    for k in ks[:80]:
        p = t.prove(k)
        wire = p.to_bytes()
        assert Proof.from_bytes(wire) == p
        present = sum(s != PLACEHOLDER for s in p.siblings)
        assert len(wire) == 3 + (len(p.siblings) + 7) // 8 + 32 * present + (64 if p.leaf else 0)
    deep = Proof(tuple(rng.choice([PLACEHOLDER, rng.randbytes(32)]) for _ in range(256)), (ks[0], ks[1]))
    assert Proof.from_bytes(deep.to_bytes()) == deep


def test_the_wire_parser_refuses_malformed_proofs():
    good = Proof((b"\x01" * 32, PLACEHOLDER, b"\x02" * 32), (b"\x03" * 32, b"\x04" * 32)).to_bytes()
    assert good[:4] == bytes([1, 0, 3, 0b10100000])
    bad = [
        b"", b"\x00", b"\x00\x00",
        good + b"\x00",                      # trailing byte
        good[:-1],                           # truncated
        b"\x02" + good[1:],                  # unknown flag
        bytes([1, 0, 3, 0b10100001]) + good[4:],  # padding bit set
        bytes([0, 1, 1]) + bytes(32),        # 257 siblings
        bytes([0, 0, 1, 0x80]) + PLACEHOLDER,  # explicit placeholder
        bytes([0, 0, 1]),                    # bitmap missing
    ]
    for b in bad:
        with pytest.raises(ValueError):
            Proof.from_bytes(b)
    with pytest.raises(ValueError):
        Proof((PLACEHOLDER,) * 257)
    with pytest.raises(ValueError):
        Proof((b"short",))
    with pytest.raises(ValueError):
        Proof((), (b"\x00" * 32,))


def test_random_bytes_and_mutated_proofs_only_ever_raise_value_error():
    rng, t, d, ks = _trie_and_keys(11, 100)
    wires = [t.prove(k).to_bytes() for k in ks[:20]]
    for _ in range(5000):
        w = bytearray(rng.choice(wires))
        op = rng.randrange(4)
        if op == 0 and w:
            w[rng.randrange(len(w))] ^= 1 << rng.randrange(8)
        elif op == 1:
            del w[rng.randrange(len(w) + 1):]
        elif op == 2:
            w += rng.randbytes(rng.randrange(1, 40))
        else:
            w = bytearray(rng.randbytes(rng.randrange(0, 200)))
        _parse_and_verify(bytes(w), t.root(), ks[0])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash_the_parser(data):
    _parse_and_verify(data, bytes(32), bytes(32))


def _parse_and_verify(data: bytes, root: bytes, key: bytes) -> None:
    try:
        p = Proof.from_bytes(data)
    except ValueError:
        return
    assert p.to_bytes() == data  # one encoding per proof
    try:
        verify(root, key, p)
    except ValueError:
        pass


def test_arguments_of_the_wrong_shape_are_value_errors():
    with pytest.raises(ValueError):
        verify(b"short", bytes(32), Proof(()))
    with pytest.raises(ValueError):
        verify(PLACEHOLDER, b"short", Proof(()))
    with pytest.raises(ValueError):
        updated_root(PLACEHOLDER, bytes(32), Proof(()), b"short")
    with pytest.raises(ValueError):
        Trie().set(bytes(32), "x" * 32)


# --- scale


def test_a_trie_of_100k_keys_stays_fast():
    import time

    rng = random.Random(5)
    t = Trie()
    for _ in range(100_000):
        t.set(rng.randbytes(32), rng.randbytes(32))
    root = t.root()
    ks = [rng.randbytes(32) for _ in range(500)]
    start = time.perf_counter()
    for k in ks:
        v = rng.randbytes(32)
        p = t.prove(k)
        root = updated_root(root, k, p, v)
        t.set(k, v)
        assert t.root() == root
    per_op = (time.perf_counter() - start) / len(ks)
    assert len(t) == 100_500
    assert per_op < 2e-3, per_op  # prove + verify/update + set + root; about 0.2 ms measured
