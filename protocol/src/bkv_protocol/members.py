"""The fleet's hsm-proxies, as the offline admin key signs them (issue #17).

Which hsm-proxies make a quorum decides how many guesses can ever be
released, so nobody who runs the fleet may choose it: an admin key kept
offline (Ed25519, the format of ``bundle.RootKey``) signs a *member set*,
fleet-init fixes the admin's public key in the token once, and an hsm-proxy
serves only when its state file names the very set the token holds, signed
by that key (``bkv_hsm_proxy.fleet_init``). Root on one host can make a
state file naming any set; without the admin key the token refuses it.

A set has an *epoch* (1 at fleet-init; each change of the set is the next)
and, from epoch 2 on, the log heads it takes over at (``heads``: island ->
(index, mac)); epoch 1 starts every island at genesis. A change begins with
a signed :class:`FreezeOrder` (the old set stops capturing) and ends with the
next set, whose heads come from the members' freeze statements
(``bkv_hsm_proxy.membership``; docs/protocol.md, "Changing the member set").
One function per transcript (:func:`message`, :func:`freeze_message`), for
the signer (``bkv-hsm-proxy sign-members``, ``sign-freeze``) and the
verifier (the hsm-proxy) alike.

File (JSON)::

    {"format": 1, "epoch": 1, "members": ["hsm-0", "hsm-1", "hsm-2"], "heads": {},
     "admin_public_key": "<base64, 32 bytes>", "signature": "<base64, 64 bytes>"}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bkv_protocol import labels
from bkv_protocol.bundle import RootKey
from bkv_protocol.encoding import b64d, b64e, canonical, digest, u64

FORMAT = 1
MAX_MEMBERS = 16  # a release carries at most 16 statements (hsm_api.ReleaseIn)
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class MemberSetError(ValueError):
    """The member set cannot be used; the message says why."""


class MalformedMemberSet(MemberSetError):
    pass


class BadMemberSignature(MemberSetError):
    """Not signed by the admin key the token holds."""


@dataclass(frozen=True)
class MemberSet:
    epoch: int
    members: tuple[str, ...]  # sorted, each once
    heads: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # island -> (index, mac); {} at epoch 1

    def __post_init__(self) -> None:
        if type(self.epoch) is not int or not 1 <= self.epoch <= 2**31:
            raise MalformedMemberSet("epoch must be a positive integer")
        if not 1 <= len(self.members) <= MAX_MEMBERS or list(self.members) != sorted(set(self.members)):
            raise MalformedMemberSet(f"members: 1 to {MAX_MEMBERS} hsm-proxy ids, each once, sorted")
        if not all(type(m) is str and _ID.fullmatch(m) for m in self.members):
            raise MalformedMemberSet("an hsm-proxy id is lowercase letters, digits and '-'")
        if self.epoch == 1 and self.heads:
            raise MalformedMemberSet("the first set starts every island at genesis: no heads")
        for island, (index, mac) in self.heads.items():
            if type(island) is not str or not _ID.fullmatch(island) or type(index) is not int \
                    or not 0 <= index < 2**63 or type(mac) is not bytes or len(mac) != 32:
                raise MalformedMemberSet("a head is an island id, an index and a 32-byte mac")

    @classmethod
    def of(cls, members: list[str], epoch: int = 1, heads: dict[str, tuple[int, bytes]] | None = None) -> MemberSet:
        return cls(epoch, tuple(sorted(set(members))), dict(heads or {}))

    def body(self) -> dict:
        return {"format": FORMAT, "epoch": self.epoch, "members": list(self.members),
                "heads": {i: {"index": n, "mac": m.hex()} for i, (n, m) in sorted(self.heads.items())}}

    def digest(self) -> bytes:
        """What a state file names its set by."""
        return digest(labels.MEMBER_SET_HASH, _canonical_json(self.body()))


def _canonical_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _signed_json(body: dict, admin_public_key: bytes, signature: bytes) -> str:
    """A set's file: its body, the admin key and the signature (also bkv_protocol.islands')."""
    return json.dumps({**body, "admin_public_key": b64e(admin_public_key), "signature": b64e(signature)},
                      sort_keys=True, indent=2) + "\n"


def message(s: MemberSet, admin_public_key: bytes) -> bytes:
    """The transcript the admin key signs: the set and the key itself."""
    return canonical(labels.SIG_MEMBER_SET, admin_public_key, u64(s.epoch), _canonical_json(s.body()))


@dataclass(frozen=True)
class _SignedSet:
    """A set and the admin key's signature over it (a member set, an island set)."""

    set: object
    admin_public_key: bytes
    signature: bytes

    def to_json(self) -> str:
        return _signed_json(self.set.body(), self.admin_public_key, self.signature)


@dataclass(frozen=True)
class SignedMemberSet(_SignedSet):
    set: MemberSet

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedMemberSet:
        """Strict: anything but what :meth:`to_json` writes is refused."""
        return _parsed("member set", text, cls._from_obj)

    @classmethod
    def _from_obj(cls, obj) -> SignedMemberSet:
        if type(obj) is not dict or set(obj) != {"format", "epoch", "members", "heads", "admin_public_key",
                                                 "signature"}:
            raise MalformedMemberSet("unexpected fields")
        if obj["format"] != FORMAT or type(obj["format"]) is not int:
            raise MalformedMemberSet(f"format {obj['format']!r}, expected {FORMAT}")
        if type(obj["members"]) is not list or type(obj["heads"]) is not dict:
            raise MalformedMemberSet("members is a list and heads an object")
        heads = {}
        for island, h in obj["heads"].items():
            if type(h) is not dict or set(h) != {"index", "mac"} or type(h["mac"]) is not str \
                    or len(h["mac"]) != 64 or h["mac"] != h["mac"].lower():
                raise MalformedMemberSet(f"bad head for {island!r}")
            heads[island] = (h["index"], bytes.fromhex(h["mac"]))
        return cls(MemberSet(obj["epoch"], tuple(obj["members"]), heads), *_key_and_signature(obj))


def sign(s: MemberSet, admin: RootKey) -> SignedMemberSet:
    return SignedMemberSet(s, admin.public, admin.sign(message(s, admin.public)))


def _parsed(what: str, text: str | bytes, build):
    """``build(the JSON)``; anything malformed as MalformedMemberSet, never another error."""
    try:
        return build(json.loads(text))
    except MemberSetError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise MalformedMemberSet(f"the {what} does not parse: {exc}") from None


def _check(what: str, admin_public_key: bytes, signed_by: bytes, signature: bytes, transcript: bytes) -> None:
    """``signature`` over ``transcript`` by ``admin_public_key`` (the token's), or BadMemberSignature."""
    if signed_by != admin_public_key:
        raise BadMemberSignature(f"the {what} was signed by another admin key than the token's")
    try:
        Ed25519PublicKey.from_public_bytes(admin_public_key).verify(signature, transcript)
    except (InvalidSignature, ValueError):
        raise BadMemberSignature(f"the {what}'s signature does not verify") from None


def _key_and_signature(obj: dict) -> tuple[bytes, bytes]:
    key, sig = b64d(obj["admin_public_key"]), b64d(obj["signature"])
    if len(key) != 32 or len(sig) != 64:
        raise MalformedMemberSet("an Ed25519 key is 32 bytes and a signature 64")
    return key, sig


def verify(signed: SignedMemberSet, admin_public_key: bytes) -> MemberSet:
    """The set, if ``admin_public_key`` (the one the token holds) signed it."""
    _check("member set", admin_public_key, signed.admin_public_key, signed.signature,
           message(signed.set, admin_public_key))
    return signed.set


# -- a change of the set: the admin's order to freeze the current one --------------------
@dataclass(frozen=True)
class FreezeOrder:
    """The admin's order that the members of the set of ``epoch`` freeze (a
    change of the set begins). Signed, so no island or operator can stop the
    hsm-proxies for good on its own: a frozen member takes part again only
    in the next set, which only the admin key can sign."""

    epoch: int
    admin_public_key: bytes
    signature: bytes

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "freeze_epoch": self.epoch,
                           "admin_public_key": b64e(self.admin_public_key), "signature": b64e(self.signature)},
                          sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> FreezeOrder:
        return _parsed("freeze order", text, cls._from_obj)

    @classmethod
    def _from_obj(cls, obj) -> FreezeOrder:
        if type(obj) is not dict or set(obj) != {"format", "freeze_epoch", "admin_public_key", "signature"} \
                or obj["format"] != FORMAT or type(obj["freeze_epoch"]) is not int or obj["freeze_epoch"] < 1:
            raise MalformedMemberSet("not a freeze order")
        return cls(obj["freeze_epoch"], *_key_and_signature(obj))


def freeze_message(epoch: int, admin_public_key: bytes) -> bytes:
    return canonical(labels.SIG_MEMBER_FREEZE, admin_public_key, u64(epoch))


def sign_freeze(epoch: int, admin: RootKey) -> FreezeOrder:
    return FreezeOrder(epoch, admin.public, admin.sign(freeze_message(epoch, admin.public)))


def verify_freeze(order: FreezeOrder, admin_public_key: bytes) -> int:
    """The epoch to freeze, if the token's admin key signed the order."""
    _check("freeze order", admin_public_key, order.admin_public_key, order.signature,
           freeze_message(order.epoch, admin_public_key))
    return order.epoch


__all__ = ["FreezeOrder", "sign_freeze", "verify_freeze", "freeze_message", "MemberSet", "SignedMemberSet", "MemberSetError", "MalformedMemberSet", "BadMemberSignature", "sign",
           "verify", "message"]
