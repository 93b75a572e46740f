"""Wire conventions shared by every service's ``api.py``.

Binary fields travel as strict standard base64 strings. Every error body has
one shape, ``{"error": {"code", "message", "retryable"}}``; the codes in
:class:`ErrorCode` are stable and documented in docs/api.md.
"""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema

from bkv_common.encoding import b64d, b64e

# Largest binary field any endpoint accepts (OPAQUE messages are < 400 bytes,
# sealed blobs < 1 KiB); anything bigger is refused before any work.
MAX_FIELD_BYTES = 4096


def _decode(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")
    if len(value) > (MAX_FIELD_BYTES * 4) // 3 + 4:
        raise ValueError("field too large")
    try:
        return b64d(value)
    except Exception:
        raise ValueError("not valid base64") from None


B64 = Annotated[
    bytes,
    BeforeValidator(_decode),
    PlainSerializer(b64e, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]


# A client-chosen id for each state-changing request (bkv_common.transcripts).
RequestId = Annotated[B64, Field(min_length=16, max_length=16)]


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
    INTERNAL = "internal"


class ErrorDetail(Frozen):
    code: ErrorCode
    message: str
    retryable: bool = False
    # The fleet's signature on no_record / record_destroyed for this request
    # (bkv_common.transcripts.refusal_answer). A device acts on those two only
    # when it verifies; every other error changes nothing on the device.
    signature: B64 | None = Field(None, exclude_if=lambda v: v is None)


class ErrorBody(Frozen):
    error: ErrorDetail
