"""The frontend's /openapi.json, made to tell the truth.

FastAPI documents 200 and a 422 the API never gives (validation is 400
``invalid_request``). Here every public operation lists each status it can
really answer, each with the one error body's schema and, as a JSON-schema
``enum`` on ``error.code``, the stable codes that status carries on that
route (client generators and schemathesis both read it). Auth is the bearer
security scheme, not header parameters.
"""

from __future__ import annotations

import copy
from typing import Iterable

from fastapi import FastAPI

from bkv_frontend import errors as ferr
from bkv_protocol import operations as ops
from bkv_protocol.operations import STATUS
from bkv_protocol.wire import ErrorBody, ErrorCode as C
from bkv_server.http import UpstreamUnavailable

# What each code means (docs/api.md: Errors); a response's description lists its codes.
_MEANING = {
    C.INVALID_REQUEST: "the body does not parse or breaks the schema, or names an unknown fleet",
    C.MALFORMED_OPAQUE_MESSAGE: "an OPAQUE message does not deserialize",
    C.CHALLENGE_REJECTED: "the challenge expired, was used, superseded, or is another user's",
    C.LOGIN_STATE_REJECTED: "the login state expired, was used, superseded, or is another user's",
    C.UNAUTHENTICATED: "no valid account token",
    C.AUTHENTICATION_FAILED: "the credential finalization did not verify (the one wrong-password error)",
    C.NO_RECORD: "nothing registered for this account (fleet-signed)",
    C.NOT_FOUND: "this fleet publishes no validation bundle",
    C.CONFLICT: "the record kept changing until the deadline; retry",
    C.REQUEST_ID_REUSED: "this request_id came before with another body",
    C.REQUEST_SUPERSEDED: "a resend whose answer is gone; start over",
    C.RECORD_DESTROYED: "attempts ran out, or the record was disabled (fleet-signed)",
    C.PAYLOAD_TOO_LARGE: "body over 64 KiB",
    C.UNSUPPORTED_MEDIA_TYPE: "not application/json",
    C.RECORD_INTEGRITY_FAILURE: "the stored record does not open for this user (tampered storage)",
    C.INTERNAL: "a bug",
    C.OUTCOME_UNKNOWN: "may or may not have landed: resend the same request (same request_id)",
    C.PASSWORD_PROOF_REQUIRED: "a live escrow changes only with proof of its password: recover it, then send "
                               "the change with the recovery's ticket",
    C.TICKET_REJECTED: "the change ticket expired, was used, or the escrow changed since: recover again",
    C.UNAVAILABLE: "temporarily unavailable: retry after Retry-After",
    C.WRONG_ISLAND: "the vault's signed island set does not place this account's record where it was looked for "
                    "(a stale routing map, or records moving to a new island): nothing was decided; retry after "
                    "Retry-After",
    C.RATE_LIMITED: "too many requests for this account, device key or source address: nothing was done; "
                    "resend after `retry_after` seconds (the body's field; also Retry-After in clear)",
    C.TOO_EARLY: "wrong guesses are spaced out: no recover start before the record's not-before time, "
                 "`state.retry_at` (ms since the epoch), fleet-signed with the record's island and version; "
                 "nothing was spent",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying (retryable errors)",
                                "schema": {"type": "integer"}}}


def _answers(*raised: type[Exception]) -> dict[int, list[C]]:
    """The status and code each of the frontend's own exceptions is answered with."""
    return _codes(*(ferr.TABLE.rule_for(cls).code for cls in raised))


def _codes(*codes: C) -> dict[int, list[C]]:
    """Codes by their one status (``bkv_protocol.operations.STATUS``)."""
    return _merge(*({STATUS[code]: [code]} for code in codes))


def _merge(*tables: dict[int, list[C]]) -> dict[int, list[C]]:
    out: dict[int, list[C]] = {}
    for table in tables:
        for status, codes in table.items():
            out[status] = out.get(status, []) + [c for c in codes if c not in out.get(status, [])]
    return dict(sorted(out.items()))


# Answered before any handler runs (GuardAndMeasure, body validation), or a bug.
_BODY = _codes(C.INVALID_REQUEST, C.PAYLOAD_TOO_LARGE, C.UNSUPPORTED_MEDIA_TYPE)
_AUTH = _answers(ferr.Unauthenticated)
_ALWAYS = _merge(_codes(C.INTERNAL), _answers(UpstreamUnavailable, ferr.NotReady))


def _operation(op: ops.Operation) -> dict[int, list[C]]:
    """A client operation's answers: its outcomes, from the catalogue (the
    island's and the hsm-proxy's, passed on unchanged), and the frontend's own."""
    return _merge(_BODY, _AUTH, _ALWAYS, _codes(*op.outcomes))


# (path, method): every error status the operation can answer, with its codes.
# tests/test_openapi_schemathesis.py fails on any status or code the API
# gives that is not listed here.
ROUTE_ERRORS: dict[tuple[str, str], dict[int, list[C]]] = {
    ("/v1/fleet", "get"): _ALWAYS,
    ("/v1/fleet", "post"): _merge(_codes(C.PAYLOAD_TOO_LARGE, C.UNSUPPORTED_MEDIA_TYPE), _ALWAYS),
    **{(op.path, "post"): _operation(op) for op in ops.CATALOGUE},
    ("/v1/record", "delete"): _operation(ops.DELETE),
    ("/v1/bundle", "get"): _codes(C.NOT_FOUND, C.INTERNAL),
}
AUTHENTICATED = {op for op, errors in ROUTE_ERRORS.items() if 401 in errors}
_AUTH_HEADERS = {"authorization", "x-bkv-device-key"}  # the token, and the edge's device key


def _error_schema(detail: dict, codes: Iterable[C]) -> dict:
    """ErrorBody with ``error.code`` narrowed to ``codes``."""
    detail = copy.deepcopy(detail)
    detail["properties"]["code"] = {"type": "string", "enum": [c.value for c in codes]}
    return {"type": "object", "title": "ErrorBody", "properties": {"error": detail}, "required": ["error"],
            "additionalProperties": False}


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` by the corrected schema, built once, here:
    call it after every route is declared."""
    original = app.openapi
    detail = ErrorBody.model_json_schema(mode="serialization")["$defs"]["ErrorDetail"]
    detail.pop("title", None)

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearerAuth"] = {
            "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
            "description": "The account token (EdDSA JWT); the user id is its sub"}
        for name in ("HTTPValidationError", "ValidationError"):
            schema["components"].get("schemas", {}).pop(name, None)
        for path, item in schema["paths"].items():
            for method, op in item.items():
                errors = ROUTE_ERRORS.get((path, method))
                if errors is None:
                    raise RuntimeError(f"{method.upper()} {path}: no error table in bkv_frontend.openapi")
                op["responses"].pop("422", None)
                for status, codes in errors.items():
                    response = {"description": "\n".join(f"- `{c.value}`: {_MEANING[c]}" for c in codes),
                                "content": {"application/json": {"schema": _error_schema(detail, codes)}}}
                    if status in (409, 429, 502, 503):
                        response["headers"] = _RETRY_AFTER
                    op["responses"][str(status)] = response
                params = [p for p in op.get("parameters", []) if p["name"].lower() not in _AUTH_HEADERS]
                if params:
                    op["parameters"] = params
                else:
                    op.pop("parameters", None)
                if (path, method) in AUTHENTICATED:
                    op["security"] = [{"bearerAuth": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    openapi()  # now, with every route declared: a route without an error table fails at startup
