"""Which island holds a user, as the offline admin key signs it (issue #25).

A device acts on a fleet-signed ``no_record`` or ``record_destroyed``. Such
an answer is true only where the user's record would be: if etcd alone
decided which island holds a user, an etcd writer could route the user to
an island that truthfully lacks the record and the boundary would sign a
genuine ``no_record`` (a new phone then makes a new key). So the *island
set* is signed by the fleet's offline admin key (the one that signs the
member set, ``bkv_protocol.members``), kept in each hsm-proxy's token, and
the island a user belongs on is computed from it inside the boundary
(:meth:`IslandSet.home`, rendezvous hashing over the user ref: adding an
island moves only the users whose highest score is now the new island's).
The island map in etcd is only the routing hint.

A set has an *epoch* (1 at fleet-init, each change the next) and, while an
add-island migration moves records, ``previous``: the islands before. Then
a user's record may be on its home under either list, and the boundary
signs a refusal only for users whose home is the same under both
(:meth:`IslandSet.settled`).

One function per transcript (:func:`message`), for the signer
(``bkv-hsm-proxy sign-islands``, ``bkv dev island-set``) and the verifier
(the hsm-proxy) alike.

File (JSON)::

    {"format": 1, "epoch": 2, "islands": ["island-a", "island-b"], "previous": ["island-a"],
     "admin_public_key": "<base64, 32 bytes>", "signature": "<base64, 64 bytes>"}
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bkv_protocol import labels
from bkv_protocol.bundle import RootKey
from bkv_protocol.encoding import canonical, digest, u64, user_ref
from bkv_protocol.members import (BadMemberSignature, MalformedMemberSet, MemberSetError, _canonical_json, _check,
                                  _key_and_signature, _parsed, _SignedSet)

FORMAT = 1
MAX_ISLANDS = 256
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # an island id (bkv_island.settings)


class IslandSetError(MemberSetError):
    """The island set cannot be used; the message says why."""


class MalformedIslandSet(IslandSetError, MalformedMemberSet):
    pass


class BadIslandSetSignature(IslandSetError, BadMemberSignature):
    """Not signed by the admin key the token holds."""


def rendezvous_ref(ref: str, islands: list[str] | tuple[str, ...]) -> str:
    """Highest-random-weight placement of a user ref (see
    :func:`bkv_protocol.encoding.user_ref`): adding an island moves only the
    users whose highest score is now the new island's."""
    if not islands:
        raise ValueError("the island map is empty")
    return max(islands, key=lambda i: digest(labels.RENDEZVOUS_HASH, i.encode(), bytes.fromhex(ref)))


def rendezvous(user_id: str, islands: list[str] | tuple[str, ...]) -> str:
    return rendezvous_ref(user_ref(user_id), islands)


def _ids(what: str, ids) -> None:
    if type(ids) is not tuple or not 1 <= len(ids) <= MAX_ISLANDS or list(ids) != sorted(set(ids)):
        raise MalformedIslandSet(f"{what}: 1 to {MAX_ISLANDS} island ids, each once, sorted")
    if not all(type(i) is str and _ID.fullmatch(i) for i in ids):
        raise MalformedIslandSet(f"{what}: an island id is lowercase letters, digits and '-'")


@dataclass(frozen=True)
class IslandSet:
    epoch: int
    islands: tuple[str, ...]                 # sorted, each once
    previous: tuple[str, ...] | None = None  # sorted; set while an add-island migration moves records

    def __post_init__(self) -> None:
        if type(self.epoch) is not int or not 1 <= self.epoch <= 2**31:
            raise MalformedIslandSet("epoch must be a positive integer")
        _ids("islands", self.islands)
        if self.previous is not None:
            _ids("previous", self.previous)
            if self.epoch == 1:
                raise MalformedIslandSet("the first island set has no previous islands")
            if self.previous == self.islands:
                raise MalformedIslandSet("previous is set only while the islands change")

    @classmethod
    def of(cls, islands: list[str], epoch: int = 1, previous: list[str] | None = None) -> IslandSet:
        return cls(epoch, tuple(sorted(set(islands))), None if previous is None else tuple(sorted(set(previous))))

    def body(self) -> dict:
        return {"format": FORMAT, "epoch": self.epoch, "islands": list(self.islands),
                "previous": None if self.previous is None else list(self.previous)}

    def digest(self) -> bytes:
        return digest(labels.ISLAND_SET_HASH, _canonical_json(self.body()))

    def home(self, ref: str) -> str:
        """The island a user (by ref) belongs on under this set's islands."""
        return rendezvous_ref(ref, self.islands)

    def candidates(self, ref: str) -> tuple[str, ...]:
        """Every island the user's record may be on now: its home, and while
        records move, its home under ``previous`` too (one, or two)."""
        home = self.home(ref)
        if self.previous is None:
            return (home,)
        old = rendezvous_ref(ref, self.previous)
        return (home,) if old == home else (home, old)

    def settled(self, ref: str, island: str) -> bool:
        """``island`` is the one place the user's record can be: its home,
        and (while records move) its home before the move as well. Only
        there may the boundary say there is no record."""
        return self.candidates(ref) == (island,)


def message(s: IslandSet, admin_public_key: bytes) -> bytes:
    """The transcript the admin key signs: the set and the key itself."""
    return canonical(labels.SIG_ISLAND_SET, admin_public_key, u64(s.epoch), _canonical_json(s.body()))


@dataclass(frozen=True)
class SignedIslandSet(_SignedSet):
    set: IslandSet

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedIslandSet:
        """Strict: anything but what :meth:`to_json` writes is refused (as MalformedIslandSet)."""
        try:
            return _parsed("island set", text, cls._from_obj)
        except IslandSetError:
            raise
        except MemberSetError as exc:
            raise MalformedIslandSet(str(exc)) from None

    @classmethod
    def _from_obj(cls, obj) -> SignedIslandSet:
        if type(obj) is not dict or set(obj) != {"format", "epoch", "islands", "previous", "admin_public_key",
                                                 "signature"}:
            raise MalformedIslandSet("unexpected fields")
        if type(obj["format"]) is not int or obj["format"] != FORMAT:
            raise MalformedIslandSet(f"format {obj['format']!r}, expected {FORMAT}")
        if type(obj["islands"]) is not list or (obj["previous"] is not None and type(obj["previous"]) is not list):
            raise MalformedIslandSet("islands is a list and previous a list or null")
        previous = None if obj["previous"] is None else tuple(obj["previous"])
        return cls(IslandSet(obj["epoch"], tuple(obj["islands"]), previous), *_key_and_signature(obj))


def sign(s: IslandSet, admin: RootKey) -> SignedIslandSet:
    return SignedIslandSet(s, admin.public, admin.sign(message(s, admin.public)))


def verify(signed: SignedIslandSet, admin_public_key: bytes) -> IslandSet:
    """The set, if ``admin_public_key`` (the one the token holds) signed it."""
    try:
        _check("island set", admin_public_key, signed.admin_public_key, signed.signature,
               message(signed.set, admin_public_key))
    except BadMemberSignature as exc:
        raise BadIslandSetSignature(str(exc)) from None
    return signed.set


def migration(current: IslandSet, new_island: str) -> tuple[IslandSet, IslandSet]:
    """The two sets adding ``new_island`` takes: the islands with it and the
    current ones as ``previous`` (records move meanwhile), then the islands
    with it alone. Both are signed before the move starts."""
    if current.previous is not None:
        raise MalformedIslandSet("a migration is still running: finish it first (its final set)")
    if new_island in current.islands:
        raise MalformedIslandSet(f"{new_island} is in the set already")
    target = sorted({*current.islands, new_island})
    return (IslandSet.of(target, current.epoch + 1, list(current.islands)),
            IslandSet.of(target, current.epoch + 2))


__all__ = ["IslandSet", "SignedIslandSet", "IslandSetError", "MalformedIslandSet", "BadIslandSetSignature",
           "sign", "verify", "message", "migration", "rendezvous", "rendezvous_ref"]
