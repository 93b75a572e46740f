"""The operation catalogue: each client operation once, by its one name.

=====================  =========================  ==========================  =================
operation              public route               what it does                 spends an attempt
=====================  =========================  ==========================  =================
registration_start     POST /v1/registration/start  OPAQUE registration, 1/2   no (new salt: no
                                                                               live record's key)
registration_finish    POST /v1/registration/finish escrow K (a live one only  no
                                                    with a change ticket)
recover_start          POST /v1/recover/start     OPAQUE login, 1/2           yes, before it runs;
                                                  (before the record's        none when too early
                                                  not-before: too_early)
recover_finish         POST /v1/recover/finish    OPAQUE login, 2/2: K back,  no (resets them)
                                                  and a change ticket
delete                 DELETE /v1/record          with a change ticket        no
events                 POST /v1/events            the account's signed event  no (reads only)
                                                  feed
=====================  =========================  ==========================  =================

The name is the SDK's step (``VaultProtocol.recover_start``), the island's
and the hsm-proxy's method, the log's op kind (``hsm_api.OpKind``) and the
metric's label. A recovery is OPAQUE's login phase: v1's wire strings that
name that phase keep it (the paths ``/v1/login/*`` served as aliases for
clients built before the catalogue, the island's paths, the op kinds'
values, the ``login_state`` field, the transcript labels and route tags:
changing one is a protocol break, ``bkv_protocol.labels``).

The same body travels every hop: the island's request is the public one
plus the user the frontend authenticated, the hsm-proxy's adds the island
and the entry it read (``bkv_protocol.wire.hop``, made in ``island_api`` and
``hsm_api``); :meth:`Operation.to_island` and :meth:`Operation.to_hsm` make
them. Each operation's outcomes are codes with one HTTP status each
(:data:`STATUS`); what a caller does on each is said where the code is
defined (``bkv_protocol.wire.ErrorCode``) and on the SDK's exception that
answers it (``bkv.errors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bkv_protocol import hsm_api, island_api, transcripts, v1
from bkv_protocol.wire import ErrorCode as C
from bkv_protocol.wire import Frozen

# Every code's one HTTP status (every service's error table takes it from here).
STATUS: dict[C, int] = {
    C.INVALID_REQUEST: 400, C.MALFORMED_OPAQUE_MESSAGE: 400, C.CHALLENGE_REJECTED: 400,
    C.LOGIN_STATE_REJECTED: 400,
    C.UNAUTHENTICATED: 401,
    C.AUTHENTICATION_FAILED: 403, C.TICKET_REJECTED: 403,
    C.NO_RECORD: 404, C.NOT_FOUND: 404,
    C.METHOD_NOT_ALLOWED: 405,
    C.CONFLICT: 409, C.REQUEST_ID_REUSED: 409, C.REQUEST_SUPERSEDED: 409, C.PASSWORD_PROOF_REQUIRED: 409,
    C.WRONG_ISLAND: 409, C.STALE_HEAD: 409, C.NOT_NEXT_ENTRY: 409, C.PROOF_REFUSED: 409,
    C.LOG_NOT_AUTHENTIC: 409, C.NO_QUORUM: 409,
    C.RECORD_DESTROYED: 410,
    C.RATE_LIMITED: 429,
    C.PAYLOAD_TOO_LARGE: 413,
    C.UNSUPPORTED_MEDIA_TYPE: 415,
    C.TOO_EARLY: 423,  # the record is locked until its signed not-before time (not 429: nothing to resend soon)
    C.INTERNAL: 500, C.RECORD_INTEGRITY_FAILURE: 500,
    C.OUTCOME_UNKNOWN: 502,
    C.UNAVAILABLE: 503, C.LOG_DIVERGED: 503,
}

# Outcomes every operation that writes (carries a request id) may meet: a
# resend answered from what was committed, or the record contended.
_WRITES = (C.CONFLICT, C.REQUEST_ID_REUSED, C.REQUEST_SUPERSEDED, C.OUTCOME_UNKNOWN, C.RECORD_INTEGRITY_FAILURE)


@dataclass(frozen=True)
class Operation:
    """One client operation, as every tier knows it."""

    name: str
    path: str                          # the public route (POST)
    request: type[Frozen]              # what the client sends (bkv_protocol.v1)
    answer: type[Frozen]               # what the fleet signs and the frontend relays unchanged
    island_path: str                   # the island's route (v1 wire string)
    island_request: type[Frozen]       # request + user_id
    hsm_request: type[Frozen]          # request + user_id, island, current
    outcomes: tuple[C, ...]            # the codes it answers besides success (each with STATUS)
    route: transcripts.Route | None = None    # a write: named so inside its fingerprint
    fields: tuple[str, ...] = ()       # a write: the request's fields in fingerprint order
    fingerprint: Callable[..., bytes] | None = None  # transcripts.*_request
    op_kind: hsm_api.OpKind | None = None     # a write: its kind in the HSM-held log
    aliases: tuple[str, ...] = ()      # public routes of clients built before (same handler)

    def to_island(self, req: Frozen, user_id: str, *, legacy: bool = False) -> Frozen:
        """The island's request: the public body and the authenticated user
        (``legacy``: it came by one of the ``aliases``)."""
        return self.island_request.model_validate({**dict(req), "user_id": user_id, "legacy": legacy})

    def to_hsm(self, req: Frozen, island: str, current: hsm_api.Entry) -> Frozen:
        """The hsm-proxy's request: the island's and the entry it read."""
        body = {k: v for k, v in dict(req).items() if k != "legacy"}
        return self.hsm_request.model_validate({**body, "island": island, "current": current})

    def request_fields(self, req: Frozen) -> tuple[bytes, ...]:
        """The request's own fields, in fingerprint order (a refusal's ``fields``)."""
        return tuple(getattr(req, f) for f in self.fields)

    def request_fingerprint(self, req: Frozen) -> bytes:
        """The whole request's fingerprint (``transcripts``), from a hop's request."""
        assert self.fingerprint is not None, f"{self.name} changes nothing: no fingerprint"
        return self.fingerprint(req.fleet_id, req.user_id, req.request_id, *self.request_fields(req))


REGISTRATION_START = Operation(
    "registration_start", "/v1/registration/start", v1.RegistrationStartRequest, v1.RegistrationStartOut,
    "/island/v1/registration/start", island_api.RegistrationStartIn, hsm_api.RegistrationStartIn,
    (C.MALFORMED_OPAQUE_MESSAGE, C.CONFLICT, C.WRONG_ISLAND, C.RATE_LIMITED))
REGISTRATION_FINISH = Operation(
    "registration_finish", "/v1/registration/finish", v1.RegistrationFinishRequest, v1.RegistrationFinishOut,
    "/island/v1/registration/finish", island_api.RegistrationFinishIn, hsm_api.RegistrationFinishIn,
    (*_WRITES, C.MALFORMED_OPAQUE_MESSAGE, C.CHALLENGE_REJECTED, C.PASSWORD_PROOF_REQUIRED, C.TICKET_REJECTED,
     C.WRONG_ISLAND, C.RATE_LIMITED),
    transcripts.Route.REGISTRATION_FINISH, ("challenge", "registration_upload", "ek", "k_nonce", "ticket"),
    transcripts.registration_finish_request, hsm_api.OpKind.REGISTRATION_FINISH)
RECOVER_START = Operation(
    "recover_start", "/v1/recover/start", v1.RecoverStartRequest, v1.RecoverStartOut,
    "/island/v1/login/start", island_api.RecoverStartIn, hsm_api.RecoverStartIn,
    (*_WRITES, C.MALFORMED_OPAQUE_MESSAGE, C.NO_RECORD, C.RECORD_DESTROYED, C.WRONG_ISLAND, C.RATE_LIMITED,
     C.TOO_EARLY),
    transcripts.Route.RECOVER_START, ("credential_request",), transcripts.recover_start_request,
    hsm_api.OpKind.RECOVER_START, aliases=("/v1/login/start",))
RECOVER_FINISH = Operation(
    "recover_finish", "/v1/recover/finish", v1.RecoverFinishRequest, v1.RecoverFinishOut,
    "/island/v1/login/finish", island_api.RecoverFinishIn, hsm_api.RecoverFinishIn,
    (*_WRITES, C.MALFORMED_OPAQUE_MESSAGE, C.LOGIN_STATE_REJECTED, C.AUTHENTICATION_FAILED, C.NO_RECORD,
     C.RECORD_DESTROYED, C.WRONG_ISLAND, C.RATE_LIMITED),
    transcripts.Route.RECOVER_FINISH, ("login_state", "credential_finalization"),
    transcripts.recover_finish_request, hsm_api.OpKind.RECOVER_FINISH, aliases=("/v1/login/finish",))
# DELETE /v1/record, and its POST twin for clients over Noise (every call a POST there).
DELETE = Operation(
    "delete", "/v1/record/delete", v1.DeleteRequest, v1.DeleteOut,
    "/island/v1/record/delete", island_api.DeleteIn, hsm_api.DeleteIn,
    (*_WRITES, C.TICKET_REJECTED, C.NO_RECORD, C.RECORD_DESTROYED, C.WRONG_ISLAND),
    transcripts.Route.DELETE, ("ticket",), transcripts.delete_request, hsm_api.OpKind.DELETE)

# Reads only: the island proves the record against a committed head, the
# boundary signs its version and event chain head (hsm_api.EventsIn, made by
# the island: it adds the proof and a quorum's statements to to_hsm's fields).
EVENTS = Operation(
    "events", "/v1/events", v1.EventsRequest, v1.EventsOut,
    "/island/v1/events", island_api.EventsIn, hsm_api.EventsIn,
    (C.WRONG_ISLAND,))

CATALOGUE: tuple[Operation, ...] = (REGISTRATION_START, REGISTRATION_FINISH, RECOVER_START, RECOVER_FINISH, DELETE,
                                    EVENTS)
BY_NAME: dict[str, Operation] = {op.name: op for op in CATALOGUE}
BY_ROUTE: dict[transcripts.Route, Operation] = {op.route: op for op in CATALOGUE if op.route is not None}
