"""Wire types of a vault island (called by the frontend).

Requests carry the user id the frontend authenticated. The answers to the
client-facing operations are the public v1 answers themselves
(``bkv_protocol.v1``), which the frontend relays unchanged: they are defined
there, once, so the public API changes only where it is written down.
"""

from __future__ import annotations



from bkv_protocol.wire import B64, Frozen, RequestId
from pydantic import Field

from bkv_protocol.hsm_api import Entry, LogEntry, Statement
from bkv_protocol.ids import FleetId, IslandId, UserId, UserRef
from bkv_protocol.v1 import (  # noqa: F401  (the island's answers: see above)
    DeleteOut,
    LoginFinishOut,
    LoginStartOut,
    RegistrationFinishOut,
    RegistrationStartOut,
)


class RegistrationStartIn(Frozen):
    user_id: UserId
    fleet_id: FleetId | None = None  # the fleet the client pinned (None: the oldest)
    registration_request: B64


class RegistrationFinishIn(Frozen):
    user_id: UserId
    fleet_id: FleetId | None = None  # the fleet the client pinned (None: the oldest)
    request_id: RequestId  # client-chosen: a resend with the same id is answered from the commit
    challenge: B64
    registration_upload: B64
    ek: B64
    k_nonce: B64
    ticket: B64 | None = None        # replacing a live escrow: proof of its password (v1.RegistrationFinishRequest)
    ticket_proof: B64 | None = None


class LoginStartIn(Frozen):
    user_id: UserId
    fleet_id: FleetId | None = None  # the fleet the client pinned (None: the oldest)
    request_id: RequestId  # client-chosen: a resend with the same id is answered from the commit
    credential_request: B64


class LoginFinishIn(Frozen):
    user_id: UserId
    fleet_id: FleetId | None = None  # the fleet the client pinned (None: the oldest)
    request_id: RequestId  # client-chosen: a resend with the same id is answered from the commit
    login_state: B64
    credential_finalization: B64


class DeleteIn(Frozen):
    user_id: UserId
    fleet_id: FleetId | None = None  # the fleet the client pinned (None: the oldest)
    request_id: RequestId  # client-chosen: a resend with the same id is answered from the commit
    ticket: B64
    ticket_proof: B64


class MoveIn(Frozen):
    """Admin: move a user's record from this island to ``to_island``."""

    user_ref: UserRef
    to_island: IslandId


class MoveOut(Frozen):
    moved: bool


class MoveInIn(Frozen):
    """Island to island: the record arrives from ``moved``, a MOVED entry its
    island committed (its head, a quorum's statements, the entry's proof)."""

    user_ref: UserRef
    moved: Entry
    from_head: LogEntry
    from_statements: list[Statement] = Field(max_length=16)
    from_proof: B64


class MigrateIn(Frozen):
    """Admin (rotation): re-seal a user's record under ``to_fleet``."""

    user_ref: UserRef
    to_fleet: FleetId


class MigrateOut(Frozen):
    migrated: bool


class ListRefsIn(Frozen):
    """Admin: which users have an entry on this island."""


class ListRefsOut(Frozen):
    user_refs: list[str]
