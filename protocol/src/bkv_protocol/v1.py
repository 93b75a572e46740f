"""Public v1 wire types (what the SDK sends and receives).

The user id never travels in a body: it comes from the verified account
token, so nobody can act on a stranger's record. The answers are defined
here and nowhere else: the island answers with them and the frontend relays
them unchanged; the client checks their fleet signatures
(``bkv_protocol.transcripts``).
"""

from __future__ import annotations

import enum

from pydantic import Field

from bkv_protocol.ids import EK_LEN, K_NONCE_LEN, FleetId
from bkv_protocol.wire import B64, Frozen, RequestId, fixed_b64

__all__ = [
    "FleetInfo", "RegistrationStartRequest", "RegistrationStartOut", "RegistrationFinishRequest",
    "RegistrationFinishOut", "RecoverStartRequest", "RecoverStartOut", "RecoverFinishRequest",
    "RecoverFinishOut", "DeleteRequest", "DeleteOut", "RecordStatus", "FleetParams",
    "EventKind", "Event", "EventsRequest", "EventsOut",
]


# Fixed sizes, refused here (400 invalid_request, as the hsm-proxy would
# refuse them) so that the published schema states them.
Ek = fixed_b64(EK_LEN)
KNonce = fixed_b64(K_NONCE_LEN)
TicketProof = fixed_b64(32)  # bkv_protocol.transcripts.ticket_proof


class FleetInfo(Frozen):
    """``GET /v1/fleet``: what a client pins. Never the OPAQUE server setup."""

    fleet_id: str
    fleet_public_key: B64
    max_attempts: int = Field(ge=1, le=1000)
    opaque_suite: str
    signature_alg: str
    edge_public_key: str = ""  # base64 X25519 key of the Noise edge, if there is one
    api_version: str = "v1"


class _Pinned(Frozen):
    # The fleet the client pinned, which must sign the answer. Left out: the
    # vault's oldest fleet (clients from before keys rotated).
    fleet_id: FleetId | None = None


class RegistrationStartRequest(_Pinned):
    registration_request: B64


class _Identified(_Pinned):
    # Client-chosen, 16 random bytes, new for each request and the same on
    # every resend of it: a resend is answered from what was committed, so it
    # never spends an attempt (bkv_protocol.transcripts).
    request_id: RequestId


class RegistrationFinishRequest(_Identified):
    challenge: B64
    registration_upload: B64
    ek: Ek
    k_nonce: KNonce
    # Replacing a live escrow (a new password or a new key) needs proof of
    # the current password: the change ticket of a recovery just made, and
    # the proof over this request (bkv_protocol.transcripts.ticket_proof).
    ticket: B64 | None = Field(None, exclude_if=lambda v: v is None)
    ticket_proof: TicketProof | None = Field(None, exclude_if=lambda v: v is None)


class RecoverStartRequest(_Identified):
    credential_request: B64


class RecoverFinishRequest(_Identified):
    login_state: B64
    credential_finalization: B64


class DeleteRequest(_Identified):
    """Deleting a live escrow needs proof of its password, as replacing it does."""

    ticket: B64
    ticket_proof: TicketProof


# -- answers (the island makes them, the frontend relays them) -------------------
class RecordStatus(str, enum.Enum):
    RESET = "reset"          # attempts back to the maximum
    DESTROYED = "destroyed"  # the last attempt was used; the client should register again


class FleetParams(Frozen):
    """What clients pin and what the frontend publishes. Never the OPAQUE setup."""

    fleet_id: str
    fleet_public_key: B64  # SubjectPublicKeyInfo DER, ECDSA P-256
    max_attempts: int = Field(ge=1, le=1000)
    opaque_suite: str = "ristretto255-tripledh-argon2id"
    signature_alg: str = "ecdsa-p256-sha256"


class RegistrationStartOut(Frozen):
    registration_response: B64
    challenge: B64
    signature: B64


class RegistrationFinishOut(Frozen):
    version: int = Field(ge=0, le=2**63 - 1)
    max_attempts: int = Field(ge=1, le=1000)
    signature: B64


class RecoverStartOut(Frozen):
    """``attempts_left`` is what remains *after* this guess; it is signed."""

    credential_response: B64
    login_state: B64
    attempts_left: int = Field(ge=0, le=1000)
    signature: B64


class RecoverFinishOut(Frozen):
    wrapped_key: B64
    rk_nonce: B64
    record_status: RecordStatus
    signature: B64
    # With record_status "reset": the change ticket, proof of this password
    # for one replacement or deletion of the escrow at its current version,
    # within a few minutes. Sealed by the HSM; its key is the device's alone.
    ticket: B64 | None = Field(None, exclude_if=lambda v: v is None)


class DeleteOut(Frozen):
    """The escrow is gone: a tombstone at ``version``, signed over the request
    (``bkv_protocol.transcripts.delete_answer``)."""

    deleted: bool
    version: int = Field(ge=0, le=2**63 - 1)
    signature: B64


# -- the account's own event feed (POST /v1/events) ---------------------------------
class EventKind(str, enum.Enum):
    """What a committed change did to the account's record (one per version)."""

    REGISTERED = "registered"              # a new escrow (none was live)
    PASSWORD_CHANGED = "password_changed"  # a live escrow replaced with proof of its password
    ATTEMPT_USED = "attempt_used"          # a recover start: one guess spent (``attempts_left`` after it)
    DESTROYED = "destroyed"                # the last attempt spent: the escrow is gone
    RECOVERED = "recovered"                # the right password: K went back (attempts reset)
    DELETED = "deleted"                    # deleted with proof of the password
    REKEYED = "rekeyed"                    # re-sealed under a newer fleet key (operator rotation)
    MOVED = "moved"                        # moved to another island (operator rebalancing)


class Event(Frozen):
    """One committed change, numbered by the record's version after it, at
    the HSM clock's time. Chained by the boundary (``transcripts.event_chain``)."""

    version: int = Field(ge=1, le=2**63 - 1)
    kind: EventKind
    attempts_left: int = Field(ge=0, le=1000)
    at_ms: int = Field(ge=0, le=2**63 - 1)  # the HSM clock, ms since the epoch


EventsHead = fixed_b64(32)


class EventsRequest(_Pinned):
    """Read this account's events. ``nonce`` (fresh, random) makes the signed
    answer this request's: an old feed cannot be replayed to hide newer events."""

    nonce: fixed_b64(16)


class EventsOut(Frozen):
    """The stored events (oldest first, the last few the vault keeps), the
    chain hash before the first of them (``before``; all zeros: the chain
    starts with the first shown), and the fleet's signature over the user,
    the record's current ``version``, its chain ``head`` and the nonce
    (``transcripts.events_answer``). The events must chain from ``before``
    to ``head``; versions below the first shown were not shown."""

    events: list[Event] = Field(max_length=1024)
    before: EventsHead
    version: int = Field(ge=0, le=2**63 - 1)
    head: EventsHead
    signature: B64
