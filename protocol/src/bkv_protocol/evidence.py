"""Deployment evidence: one published statement per fleet (docs/ota.md).

It names the fleet's keys, what the HSM token says about them (generated on
the token, sensitive, never extractable), the token, the software version,
and the hash of the validation bundle that introduced the fleet. The fleet
key itself signs it inside the HSM (proof that whoever holds that key made
this statement), and the operator root signs the whole. ``bkv audit``
checks it against the bundle chain.

The signed bytes are the statement's canonical JSON (sorted keys, no
spaces), under each signature's own label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bkv_protocol import labels
from bkv_protocol.bundle import RootKey
from bkv_protocol.encoding import b64d, b64e, canonical

# What every key of a fleet must be, as the token reports it.
REQUIRED_ATTRIBUTES = {"local": True, "sensitive": True, "extractable": False, "never_extractable": True}


class EvidenceError(Exception):
    """The statement is malformed, a signature fails, or it contradicts itself."""


def statement_bytes(statement: dict) -> bytes:
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Evidence:
    statement: dict
    fleet_signature: bytes  # ECDSA P-256 by the fleet key, inside the HSM
    operator_signature: bytes  # Ed25519 by the operator root

    def to_json(self) -> str:
        return json.dumps({"statement": self.statement, "fleet_signature": b64e(self.fleet_signature),
                           "operator_signature": b64e(self.operator_signature)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Evidence:
        try:
            d = json.loads(text)
            return cls(dict(d["statement"]), b64d(d["fleet_signature"]), b64d(d["operator_signature"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise EvidenceError(f"the evidence does not parse: {type(exc).__name__}") from None


def fleet_message(statement: dict) -> bytes:
    return canonical(labels.SIG_EVIDENCE_FLEET, statement_bytes(statement))


def operator_sign(statement: dict, fleet_signature: bytes, operator_key: RootKey) -> Evidence:
    message = canonical(labels.SIG_EVIDENCE_OPERATOR, statement_bytes(statement), fleet_signature)
    return Evidence(statement, fleet_signature, operator_key.sign(message))


def verify(ev: Evidence, operator_root: bytes) -> None:
    """Both signatures and the attributes; the caller checks ``bundle_hash``
    and the keys against the bundle chain."""
    st = ev.statement
    try:
        Ed25519PublicKey.from_public_bytes(operator_root).verify(
            ev.operator_signature, canonical(labels.SIG_EVIDENCE_OPERATOR, statement_bytes(st), ev.fleet_signature))
    except (InvalidSignature, ValueError):
        raise EvidenceError("the operator signature of the evidence does not verify") from None
    try:
        key = serialization.load_der_public_key(b64d(st["fleet_public_key"]))
        key.verify(ev.fleet_signature, fleet_message(st), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        raise EvidenceError("the fleet key's signature of the evidence does not verify") from None
    for name in ("signing", "sealing"):
        got = (st.get("key_attributes") or {}).get(name)
        if got != REQUIRED_ATTRIBUTES:
            raise EvidenceError(f"the {name} key is not attested as generated on the token, sensitive and "
                                f"never extractable: {got}")
