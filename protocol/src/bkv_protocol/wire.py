"""Wire conventions shared by every service's ``api.py``.

Binary fields travel as strict standard base64 strings. Every error body has
one shape, ``{"error": {"code", "message", "retryable"}}``; the codes in
:class:`ErrorCode` are stable and documented in docs/api.md.
"""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema

from bkv_protocol.encoding import b64d, b64e

# Largest binary field any endpoint accepts (OPAQUE messages are < 400 bytes,
# sealed blobs < 1 KiB); anything bigger is refused before any work.
MAX_FIELD_BYTES = 4096
# Its longest base64 form (padded: a multiple of 4 characters).
_MAX_FIELD_CHARS = 4 * -(-MAX_FIELD_BYTES // 3)

# Strict standard base64 with padding: the pattern the schema publishes.
# _decode accepts exactly these strings (tests/test_unit_wire_schema.py), on
# any 3.11 patch release: it checks the padding itself rather than rely on
# how strict this Python's b64decode is about it.
_B64_RE = r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"


def _decode(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")
    if len(value) > _MAX_FIELD_CHARS:
        raise ValueError("field too large")
    # Whole 4-character blocks, "=" only as the last one or two (a regex here
    # costs several times the decode); b64d(validate=True) checks the alphabet.
    data = value.rstrip("=")
    if len(value) % 4 or len(value) - len(data) > 2 or "=" in data:
        raise ValueError("not valid base64")
    try:
        return b64d(value)
    except Exception:
        raise ValueError("not valid base64") from None


def _b64_schema(size: int | None = None) -> dict:
    """The JSON schema of a base64 field: any size up to MAX_FIELD_BYTES, or
    exactly ``size`` bytes (its encoded length and padding are then fixed)."""
    if size is None:
        return {"type": "string", "contentEncoding": "base64", "pattern": f"^{_B64_RE}$",
                "maxLength": _MAX_FIELD_CHARS}
    chars, pad = 4 * -(-size // 3), (3 - size % 3) % 3
    return {"type": "string", "contentEncoding": "base64", "pattern": f"^[A-Za-z0-9+/]{{{chars - pad}}}{'=' * pad}$",
            "minLength": chars, "maxLength": chars, "description": f"{size} bytes, base64"}


B64 = Annotated[
    bytes,
    BeforeValidator(_decode),
    PlainSerializer(b64e, return_type=str, when_used="json"),
    WithJsonSchema(_b64_schema()),
]


def fixed_b64(size: int) -> object:
    """A base64 field of exactly ``size`` bytes (400 invalid_request otherwise)."""
    return Annotated[bytes, BeforeValidator(_decode), Field(min_length=size, max_length=size),
                     PlainSerializer(b64e, return_type=str, when_used="json"), WithJsonSchema(_b64_schema(size))]


# A client-chosen id for each state-changing request (bkv_protocol.transcripts).
RequestId = fixed_b64(16)


class Frozen(BaseModel):
    """Base of every wire model: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ErrorCode(str, enum.Enum):
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAUTHENTICATED = "unauthenticated"
    MALFORMED_OPAQUE_MESSAGE = "malformed_opaque_message"
    NO_RECORD = "no_record"
    RECORD_DESTROYED = "record_destroyed"
    CHALLENGE_REJECTED = "challenge_rejected"
    LOGIN_STATE_REJECTED = "login_state_rejected"
    AUTHENTICATION_FAILED = "authentication_failed"
    RECORD_INTEGRITY_FAILURE = "record_integrity_failure"
    CONFLICT = "conflict"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    OUTCOME_UNKNOWN = "outcome_unknown"
    REQUEST_ID_REUSED = "request_id_reused"
    REQUEST_SUPERSEDED = "request_superseded"
    PASSWORD_PROOF_REQUIRED = "password_proof_required"  # a live escrow: recover it first, then change it
    TICKET_REJECTED = "ticket_rejected"    # the change ticket expired, was used, or is not this escrow's
    # The island asked is not the one the boundary's signed island set places the user on
    # (bkv_protocol.islands): no refusal is signed and no record made there. Ask again later.
    WRONG_ISLAND = "wrong_island"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INTERNAL = "internal"
    # Over a rate limit (per account, device or source address): nothing was done; resend after
    # ``retry_after`` seconds (the body's field; the Retry-After header says the same in clear).
    RATE_LIMITED = "rate_limited"
    # A recover start before the record's not-before time (wrong guesses are spaced out in time,
    # by the HSM's clock): nothing was spent; the signed ``state.retry_at`` says when to try again.
    TOO_EARLY = "too_early"
    # The HSM-held log (island <-> hsm-proxy only; a device sees them as 503 unavailable).
    STALE_HEAD = "stale_head"              # the head shown is older than the boundary's: catch up
    NOT_NEXT_ENTRY = "not_next_entry"      # capture refused: not the next link of this hsm-proxy's chain
    PROOF_REFUSED = "proof_refused"        # a record that is not what the log says
    LOG_NOT_AUTHENTIC = "log_not_authentic"
    NO_QUORUM = "no_quorum"                # too few hsm-proxies captured the entry yet
    LOG_DIVERGED = "log_diverged"          # etcd is behind the boundary or does not add up: fail closed


class SignedState(Frozen):
    """What a per-state signature covers besides the fleet, the user and the
    code (``bkv_protocol.transcripts.state_answer``): the record's island and
    version the boundary proved, and for ``too_early`` the record's
    not-before time (ms since the Unix epoch, by the HSM's clock)."""

    island: str = Field(max_length=64)
    version: int = Field(ge=0)
    retry_at: int | None = Field(None, ge=0, exclude_if=lambda v: v is None)


class ErrorDetail(Frozen):
    code: ErrorCode
    message: str
    retryable: bool = False
    # The fleet's signature on no_record / record_destroyed / too_early. With ``state``: over that
    # record state (transcripts.state_answer, made once per state and served again); without: over
    # this request (transcripts.refusal_answer, fleets built before). A device acts on these only
    # when it verifies; every other error changes nothing on the device.
    signature: B64 | None = Field(None, exclude_if=lambda v: v is None)
    # rate_limited only: whole seconds to wait before sending again. In the body
    # because a sealed answer carries no header but its status (docs/edge.md).
    retry_after: int | None = Field(None, ge=0, exclude_if=lambda v: v is None)
    state: SignedState | None = Field(None, exclude_if=lambda v: v is None)


class ErrorBody(Frozen):
    error: ErrorDetail


def hop(name: str, body: type[Frozen], doc: str, module: str, **added) -> type[Frozen]:
    """The request a hop sends on: ``body``'s fields (the request as the
    client sent it, the same body all the way) and the fields the hop adds
    (``added``: name -> (type, default or ``...``)). Made here for every
    operation (``bkv_protocol.operations``), so a field added to a request
    reaches every hop without being declared again."""
    from pydantic import create_model

    return create_model(name, __base__=body, __doc__=doc, __module__=module, **added)
