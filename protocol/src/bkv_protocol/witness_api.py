"""Wire types of the witness. Bundles travel as their JSON text
(bkv_protocol.bundle.SignedBundle.to_json); the signatures cover the
canonical encoding, not this JSON."""

from __future__ import annotations

from pydantic import Field

from bkv_protocol.wire import B64, Frozen


class CountersignIn(Frozen):
    bundle: str  # SignedBundle JSON, operator-signed


class CountersignOut(Frozen):
    """Countersigned: ``witness_signature`` goes into the bundle before
    publishing it. Asking again for the same bundle returns the same answer."""

    witness_signature: B64
    sequence: int = Field(ge=1, le=2**63 - 1)  # as bkv_protocol.bundle reads it


class LogOut(Frozen):
    """Every bundle ever countersigned, oldest first, as SignedBundle JSON."""

    entries: list[str]


class PublicKeyOut(Frozen):
    witness_public_key: B64
