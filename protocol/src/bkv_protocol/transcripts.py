"""Every fleet-signed transcript, one function each, and the fingerprint of
every state-changing request. The hsm-proxy calls these to sign and the SDK
calls the very same functions to verify, so the two can never disagree on
which fields a signature covers.

A state-changing request (registration finish, recover start, recover finish, delete)
carries a client-chosen ``request_id`` (16 random bytes). Its *fingerprint*
is a hash over the route, the pinned fleet, the user, the request id and
every field of the body: the whole request. Each answer's signature covers
the fingerprint, so

* an answer is bound to the request it answers (an old signed answer, or one
  made for another request, fails the device's check), and
* the island can tell a resend (same id, same fingerprint: answer from what
  was committed) from a different request reusing an id (refused).

A live escrow changes only with proof of its password: a successful recover
finish hands the device a *change ticket* (sealed by the HSM, bound to the
user, island and the record's version) whose key only the two ends of that
login know (:func:`ticket_key`, from the OPAQUE session key); a replacing
registration or a deletion carries the ticket and :func:`ticket_proof`, a MAC
under that key over the request's fingerprint, which no tier can make.

The operations are named as in the catalogue (``bkv_protocol.operations``):
registration and *recover*; a recovery is OPAQUE's login phase, and the
labels and route strings inside transcripts keep v1's names for it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bkv_protocol import labels
from bkv_protocol.encoding import canonical, digest, request_digest, u32, u64

REQUEST_ID_LEN = 16


class Route(str, enum.Enum):
    """The state-changing requests, as named inside fingerprints. The
    values are v1's wire strings: a recovery is OPAQUE's login phase, and
    the fingerprints say so (changing a value is a protocol break)."""

    REGISTRATION_FINISH = "registration-finish"
    RECOVER_START = "login-start"
    RECOVER_FINISH = "login-finish"
    DELETE = "delete"


class Refusal(str, enum.Enum):
    """Signed outcomes without an OPAQUE message: each changes what a device
    does, so each is signed -- over a record state (:func:`state_answer`),
    or, by fleets built before, over the request (:func:`refusal_answer`)."""

    NO_RECORD = "no_record"
    RECORD_DESTROYED = "record_destroyed"
    TOO_EARLY = "too_early"  # per state only: the record's not-before time has not come


def _fleet(fleet_id: str | None) -> bytes:
    return (fleet_id or "").encode()


def _fingerprint(route: Route, fleet_id: str | None, user_id: str, request_id: bytes, *fields: bytes) -> bytes:
    if len(request_id) != REQUEST_ID_LEN:
        raise ValueError(f"a request id is {REQUEST_ID_LEN} bytes")
    return digest(labels.REQUEST_FINGERPRINT, route.value.encode(), _fleet(fleet_id), user_id.encode(), request_id,
                  *fields)


# -- request fingerprints (the whole request) ------------------------------------------
def registration_finish_request(fleet_id: str | None, user_id: str, request_id: bytes, challenge: bytes,
                                registration_upload: bytes, ek: bytes, k_nonce: bytes,
                                ticket: bytes | None = None) -> bytes:
    """``ticket``: a change ticket, to replace a live escrow (without one the
    fingerprint is that of the build before tickets: its kept answers still
    match their resends)."""
    return _fingerprint(Route.REGISTRATION_FINISH, fleet_id, user_id, request_id, challenge, registration_upload,
                        ek, k_nonce, *((ticket,) if ticket else ()))


def recover_start_request(fleet_id: str | None, user_id: str, request_id: bytes, credential_request: bytes) -> bytes:
    return _fingerprint(Route.RECOVER_START, fleet_id, user_id, request_id, credential_request)


def recover_finish_request(fleet_id: str | None, user_id: str, request_id: bytes, login_state: bytes,
                         credential_finalization: bytes) -> bytes:
    return _fingerprint(Route.RECOVER_FINISH, fleet_id, user_id, request_id, login_state, credential_finalization)


def delete_request(fleet_id: str | None, user_id: str, request_id: bytes, ticket: bytes) -> bytes:
    return _fingerprint(Route.DELETE, fleet_id, user_id, request_id, ticket)


# The fields of each request a signed refusal may answer, in fingerprint order.
_REFUSABLE = {Route.RECOVER_START: recover_start_request, Route.RECOVER_FINISH: recover_finish_request,
              Route.DELETE: delete_request}


def refusable_request(route: Route, fleet_id: str | None, user_id: str, request_id: bytes,
                      fields: list[bytes]) -> bytes:
    """The fingerprint of a request the boundary is asked to refuse, computed
    by the boundary from the request itself (never taken from the caller),
    so a refusal signed for one user's request cannot answer another's.
    ValueError: not a refusable route, or the wrong number of fields."""
    make = _REFUSABLE.get(route)
    if make is None:
        raise ValueError(f"{route.value} is never answered with a signed refusal")
    try:
        return make(fleet_id, user_id, request_id, *fields)
    except TypeError:
        raise ValueError(f"a {route.value} request has other fields") from None


# -- change tickets ------------------------------------------------------------------------
def ticket_key(session_key: bytes) -> bytes:
    """The key of the change ticket issued at a login finish, from that
    login's OPAQUE session key: the device and the HSM have it, no tier does."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=labels.TICKET_KEY_INFO).derive(session_key)


def ticket_proof(key: bytes, request: bytes) -> bytes:
    """The device's proof that it holds the ticket's key, over the
    fingerprint of the one request it authorises."""
    return hmac.new(key, canonical(labels.TICKET_PROOF_MAC, request), hashlib.sha256).digest()


# -- signed answers ---------------------------------------------------------------------
# ``fleet_id`` is the signing fleet (the one the client pinned), never empty here.
def registration_start_answer(fleet_id: str, user_id: str, registration_request: bytes,
                              registration_response: bytes, challenge: bytes) -> bytes:
    """Registration start changes nothing, so it has no request id; the
    request is its (random, blinded) OPAQUE message."""
    return canonical(labels.SIG_REGISTRATION_START, fleet_id.encode(), user_id.encode(),
                     request_digest(registration_request), registration_response, challenge)


def registration_finish_answer(fleet_id: str, request: bytes, version: int, max_attempts: int) -> bytes:
    """``request`` is :func:`registration_finish_request`: it covers ``ek``,
    ``k_nonce`` and the challenge, so a tier that swaps them gets no signature."""
    return canonical(labels.SIG_REGISTRATION_FINISH, fleet_id.encode(), request, u64(version), u32(max_attempts))


def recover_start_answer(fleet_id: str, request: bytes, credential_response: bytes, attempts_left: int) -> bytes:
    return canonical(labels.SIG_LOGIN_START, fleet_id.encode(), request, credential_response, u32(attempts_left))


def recover_finish_answer(fleet_id: str, request: bytes, wrapped_key: bytes, rk_nonce: bytes,
                        record_status: str) -> bytes:
    return canonical(labels.SIG_LOGIN_FINISH, fleet_id.encode(), request, wrapped_key, rk_nonce,
                     record_status.encode())


def delete_answer(fleet_id: str, request: bytes, version: int) -> bytes:
    """The escrow is deleted: its entry is a tombstone at ``version``. Only
    this makes a device act on a deletion (``bkv disable --delete-backups``)."""
    return canonical(labels.SIG_DELETE, fleet_id.encode(), request, u64(version))


def refusal_answer(fleet_id: str, request: bytes, refusal: Refusal) -> bytes:
    """``no_record`` or ``record_destroyed`` for the request fingerprinted as ``request``."""
    return canonical(labels.SIG_REFUSAL, fleet_id.encode(), request, refusal.value.encode())


def state_answer(fleet_id: str, user_id: str, island: str, version: int, refusal: Refusal,
                 retry_at_ms: int = 0) -> bytes:
    """``refusal`` for the user's record as the boundary proved it: on
    ``island`` at ``version`` (absent: no entry ever, or gone; destroyed: a
    tombstone; too early: live, its not-before ``retry_at_ms`` not yet come,
    by the HSM's clock). Bound to a record state, not to a request: made once
    per state and served again to every request that meets it, so a flood at
    a dead or absent account costs no new signature. Why a replay of it is
    harmless: docs/protocol.md, "Refusals"."""
    return canonical(labels.SIG_STATE, fleet_id.encode(), user_id.encode(), island.encode(), u64(version),
                     refusal.value.encode(), u64(retry_at_ms))


# -- the account's event feed --------------------------------------------------------------
EVENTS_EMPTY = bytes(32)  # the chain head of a record with no event yet (and of records older than the feed)


def event_bytes(version: int, kind: str, attempts_left: int, at_ms: int) -> bytes:
    """One event as it is chained (``bkv_protocol.v1.Event``'s fields)."""
    return canonical(b"", u64(version), kind.encode(), u32(attempts_left), u64(at_ms))


def event_chain(head: bytes, event: bytes) -> bytes:
    """The chain head after ``event``: ``H(label, head, event)``. The boundary
    computes it at every change and keeps it in the record's entry, which the
    log proves; a device recomputes it over the events it is shown."""
    return digest(labels.EVENT_CHAIN, head, event)


def events_answer(fleet_id: str, user_id: str, version: int, head: bytes, nonce: bytes) -> bytes:
    """The feed's signature: the account's record is at ``version`` with
    event chain ``head``, answering the read that sent ``nonce``."""
    return canonical(labels.SIG_EVENTS, fleet_id.encode(), user_id.encode(), u64(version), head, nonce)


def reply_aad(user_ref: str, island: str, version: int, request_id: bytes, request: bytes) -> bytes:
    """Associated data of a committed answer kept sealed in the entry for
    resends: bound to the user, island and entry version it was committed
    with, and to the exact request."""
    return canonical(labels.REPLY_AAD, bytes.fromhex(user_ref), island.encode(), u64(version), request_id, request)
