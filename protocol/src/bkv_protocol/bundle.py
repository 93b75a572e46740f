"""Validation bundles: fleet keys over the air (docs/ota.md).

A bundle lists the fleets a client may talk to -- each fleet's id, signing
public key, Noise edge key and validity window -- with a sequence number and
the hash of the bundle before it. The operator signs it; a witness run by a
separate party countersigns it, and only if it extends the witness's
append-only log. A client pins the two root public keys, never fleet keys.

What is signed is the canonical encoding (:func:`bundle_body`), never JSON.

Exceptions::

    BundleError                 the bundle must not be used
    ├── MalformedBundle         it does not parse or breaks a format rule
    ├── BadBundleSignature      a signature is missing or wrong (``party`` says whose)
    ├── BundleRollback          its sequence is below one already accepted
    └── BundleStale             it is past its ``expires_at`` or older than the client's maximum age

Freshness: the operator signs ``issued_at`` and ``expires_at`` into every
bundle and re-signs the current content on a schedule (``bkv-hsm-proxy
resign-bundle``, daily), so a client can tell a withheld newer bundle from
"nothing changed": it uses a bundle only until ``expires_at`` and at most
its own maximum age after ``issued_at`` (:func:`fresh_until`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bkv_protocol import labels
from bkv_protocol.encoding import b64d, b64e, canonical, digest, fleet_id_for, u32, u64
from bkv_protocol.secrets import Secret

# 2: issued_at and expires_at are signed and enforced (format 1 had no expiry, so a
# withheld newer bundle could freeze a client on old fleet keys; it is refused).
FORMAT_VERSION = 2
GENESIS = bytes(32)  # prev_hash of the first bundle
RESIGN_PERIOD_S = 86400  # the operator re-signs the current bundle daily
DEFAULT_VALIDITY_S = 7 * 86400  # expires_at - issued_at the operator signs by default


class BundleError(Exception):
    """The bundle must not be used; keep the last good one."""


class MalformedBundle(BundleError):
    pass


class BadBundleSignature(BundleError):
    def __init__(self, party: str, message: str) -> None:
        super().__init__(message)
        self.party = party


class BundleRollback(BundleError):
    pass


class BundleStale(BundleError):
    """Validly signed, but too old to trust: a newer bundle may exist and be
    withheld. ``stale_since`` is when it stopped being usable (unix seconds)."""

    def __init__(self, message: str, stale_since: float) -> None:
        super().__init__(message)
        self.stale_since = stale_since


class RootKey(Secret):
    """An Ed25519 root private key (the operator's or the witness's)."""

    kind = "RootKey"

    @classmethod
    def generate(cls) -> RootKey:
        return cls(Ed25519PrivateKey.generate().private_bytes_raw())

    @property
    def public(self) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.reveal()).public_key().public_bytes_raw()

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.reveal()).sign(message)


@dataclass(frozen=True)
class Fleet:
    fleet_id: str
    fleet_public_key: bytes  # SubjectPublicKeyInfo DER, ECDSA P-256
    edge_public_key: bytes  # X25519, 32 bytes
    not_before: int  # unix seconds
    not_after: int

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after


@dataclass(frozen=True)
class Bundle:
    sequence: int
    prev_hash: bytes
    issued_at: int
    expires_at: int  # unix seconds: no client uses the bundle from then on
    fleets: tuple[Fleet, ...]
    format_version: int = FORMAT_VERSION


@dataclass(frozen=True)
class SignedBundle:
    bundle: Bundle
    operator_signature: bytes
    witness_signature: bytes = b""

    # -- JSON (transport only; the signatures cover bundle_body) -------------------------
    def to_json(self) -> str:
        b = self.bundle
        return json.dumps({
            "bundle": {"format_version": b.format_version, "sequence": b.sequence, "prev_hash": b64e(b.prev_hash),
                       "issued_at": b.issued_at, "expires_at": b.expires_at, "fleets": [
                           {"fleet_id": f.fleet_id, "fleet_public_key": b64e(f.fleet_public_key),
                            "edge_public_key": b64e(f.edge_public_key), "not_before": f.not_before,
                            "not_after": f.not_after} for f in b.fleets]},
            "operator_signature": b64e(self.operator_signature),
            "witness_signature": b64e(self.witness_signature)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedBundle:
        try:
            d = json.loads(text)
            b = d["bundle"]
            fleets = tuple(Fleet(_str(f["fleet_id"]), b64d(f["fleet_public_key"]), b64d(f["edge_public_key"]),
                                 _int(f["not_before"]), _int(f["not_after"])) for f in b["fleets"])
            if _int(b["format_version"]) != FORMAT_VERSION:
                raise MalformedBundle(f"bundle format {b['format_version']} is not {FORMAT_VERSION}")
            bundle = Bundle(_int(b["sequence"]), b64d(b["prev_hash"]), _int(b["issued_at"]),
                            _int(b["expires_at"]), fleets, _int(b["format_version"]))
            signed = cls(bundle, b64d(d["operator_signature"]), b64d(d.get("witness_signature", "")))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise MalformedBundle(f"the bundle does not parse: {type(exc).__name__}") from None
        check_format(bundle)
        return signed

    def with_witness(self, signature: bytes) -> SignedBundle:
        return SignedBundle(self.bundle, self.operator_signature, signature)


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError("not a string")
    return v


def _int(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 2**63 - 1:  # packed as u64, +1 fits
        raise ValueError("not an integer in [0, 2^63)")
    return v


def check_format(b: Bundle) -> None:
    if b.format_version != FORMAT_VERSION:
        raise MalformedBundle(f"bundle format {b.format_version} is not {FORMAT_VERSION}")
    if b.sequence < 1 or len(b.prev_hash) != 32 or (b.sequence == 1) != (b.prev_hash == GENESIS):
        raise MalformedBundle("the sequence or the previous hash is not valid")
    if b.expires_at <= b.issued_at:
        raise MalformedBundle("a bundle expires after it is issued")
    if not b.fleets or len({f.fleet_id for f in b.fleets}) != len(b.fleets):
        raise MalformedBundle("a bundle lists one or more fleets, each once")
    for f in b.fleets:
        # A fleet id is derived from its key, never taken on trust.
        if f.fleet_id != fleet_id_for(f.fleet_public_key) or len(f.edge_public_key) != 32 \
                or f.not_before >= f.not_after:
            raise MalformedBundle(f"fleet {f.fleet_id!r} is not well formed")


def bundle_body(b: Bundle) -> bytes:
    """The one transcript both signatures cover (through :func:`bundle_hash`):
    the signer and every verifier call this, never their own encoding."""
    fields = [u32(b.format_version), u64(b.sequence), b.prev_hash, u64(b.issued_at), u64(b.expires_at),
              u32(len(b.fleets))]
    for f in b.fleets:
        fields += [f.fleet_id.encode(), f.fleet_public_key, f.edge_public_key, u64(f.not_before), u64(f.not_after)]
    return canonical(labels.BUNDLE_BODY, *fields)


def bundle_hash(b: Bundle) -> bytes:
    return digest(labels.BUNDLE_HASH, bundle_body(b))


def _operator_message(b: Bundle) -> bytes:
    return canonical(labels.SIG_BUNDLE_OPERATOR, bundle_hash(b))


def _witness_message(b: Bundle, operator_signature: bytes) -> bytes:
    # The witness signs over the operator's signature too: a countersignature.
    return canonical(labels.SIG_BUNDLE_WITNESS, bundle_hash(b), operator_signature)


def operator_sign(b: Bundle, key: RootKey) -> SignedBundle:
    check_format(b)
    return SignedBundle(b, key.sign(_operator_message(b)))


def witness_countersign(signed: SignedBundle, key: RootKey) -> bytes:
    return key.sign(_witness_message(signed.bundle, signed.operator_signature))


def _verify(public: bytes, signature: bytes, message: bytes, party: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise BadBundleSignature(party, f"the {party} signature of the bundle does not verify") from None


def verify_operator(signed: SignedBundle, operator_root: bytes) -> None:
    check_format(signed.bundle)
    _verify(operator_root, signed.operator_signature, _operator_message(signed.bundle), "operator")


def verify(signed: SignedBundle, operator_root: bytes, witness_root: bytes, *, min_sequence: int = 0) -> None:
    """Both signatures, the format, and no rollback below ``min_sequence``."""
    verify_operator(signed, operator_root)
    _verify(witness_root, signed.witness_signature, _witness_message(signed.bundle, signed.operator_signature),
            "witness")
    if signed.bundle.sequence < min_sequence:
        raise BundleRollback(f"bundle {signed.bundle.sequence} is older than the accepted {min_sequence}")


def fresh_until(b: Bundle, max_age_s: float) -> float:
    """When a client with this maximum age stops using the bundle: at its
    signed ``expires_at``, or ``max_age_s`` after ``issued_at`` if sooner
    (the client's own bound, whatever window the operator signed)."""
    return min(b.expires_at, b.issued_at + max_age_s)


def check_fresh(b: Bundle, max_age_s: float, now: float) -> None:
    """Raise :class:`BundleStale` if the bundle must not be used at ``now``."""
    until = fresh_until(b, max_age_s)
    if now >= until:
        raise BundleStale(f"validation bundle {b.sequence} (issued {_utc(b.issued_at)}) stopped being usable at "
                          f"{_utc(until)}", until)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def next_bundle(prev: SignedBundle | None, fleets: list[Fleet], now: int | None = None,
                valid_for_s: int = DEFAULT_VALIDITY_S) -> Bundle:
    """The bundle that extends ``prev`` (or the first one), issued ``now`` and
    expiring ``valid_for_s`` later."""
    issued = int(time.time()) if now is None else now
    return Bundle(sequence=prev.bundle.sequence + 1 if prev else 1,
                  prev_hash=bundle_hash(prev.bundle) if prev else GENESIS,
                  issued_at=issued, expires_at=issued + valid_for_s, fleets=tuple(fleets))


def public_key_b64(key: RootKey) -> str:
    return b64e(key.public)


def new_root_key_file(path) -> RootKey:
    """A new Ed25519 root key written to ``path`` (base64, mode 0600); an
    existing file is never overwritten (FileExistsError)."""
    import os
    from pathlib import Path

    key = RootKey.generate()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(b64e(key.reveal()) + "\n")
    return key


def load_root_key(path) -> RootKey:
    from pathlib import Path

    raw = b64d(Path(path).read_text().strip())
    if len(raw) != 32:
        raise ValueError(f"{path}: not an Ed25519 private key")
    return RootKey(raw)


__all__ = ["Bundle", "Fleet", "SignedBundle", "RootKey", "BundleError", "MalformedBundle", "BadBundleSignature",
           "BundleRollback", "BundleStale", "check_fresh", "fresh_until", "bundle_body", "bundle_hash", "operator_sign", "witness_countersign", "verify",
           "verify_operator", "next_bundle"]


def read_log(text: str) -> list[str]:
    """The entries of a witness log (the JSON of GET /witness/v1/log, or the
    log file's lines), as the exact texts the witness wrote."""
    text = text.strip()
    if text.startswith('{"entries"'):
        try:
            return list(json.loads(text)["entries"])
        except (ValueError, KeyError):
            raise MalformedBundle("the witness log does not parse") from None
    return [line for line in text.split("\n") if line]
