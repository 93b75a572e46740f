"""Wire types of a vault island (called by the frontend).

The responses are exactly what the client receives; the frontend passes
them through. Requests carry the user id the frontend authenticated.
"""

from __future__ import annotations

from pydantic import Field

from bkv_common.wire import B64, Frozen, RequestId
from bkv_hsm_proxy.api import FleetId, IslandId, RecordStatus, UserId, UserRef


class RegistrationStartIn(Frozen):
    user_id: UserId
    fleet_id: FleetId | None = None  # the fleet the client pinned (None: the oldest)
    registration_request: B64


class RegistrationStartOut(Frozen):
    registration_response: B64
    challenge: B64
    signature: B64


class RegistrationFinishIn(Frozen):
    user_id: UserId
    fleet_id: FleetId | None = None  # the fleet the client pinned (None: the oldest)
    request_id: RequestId  # client-chosen: a resend with the same id is answered from the commit
    challenge: B64
    registration_upload: B64
    ek: B64
    k_nonce: B64


class RegistrationFinishOut(Frozen):
    version: int = Field(ge=0, le=2**63 - 1)
    max_attempts: int = Field(ge=1, le=1000)
    signature: B64


class RecoveryStartIn(Frozen):
    user_id: UserId
    fleet_id: FleetId | None = None  # the fleet the client pinned (None: the oldest)
    request_id: RequestId  # client-chosen: a resend with the same id is answered from the commit
    credential_request: B64


class RecoveryStartOut(Frozen):
    """``attempts_left`` is what remains *after* this guess; it is signed."""

    credential_response: B64
    login_state: B64
    attempts_left: int = Field(ge=0, le=1000)
    signature: B64


class RecoveryFinishIn(Frozen):
    user_id: UserId
    fleet_id: FleetId | None = None  # the fleet the client pinned (None: the oldest)
    request_id: RequestId  # client-chosen: a resend with the same id is answered from the commit
    login_state: B64
    credential_finalization: B64


class RecoveryFinishOut(Frozen):
    wrapped_key: B64
    rk_nonce: B64
    record_status: RecordStatus
    signature: B64


class DeleteIn(Frozen):
    user_id: UserId


class DeleteOut(Frozen):
    deleted: bool


class MoveIn(Frozen):
    """Admin: move a user's record from this island to ``to_island``."""

    user_ref: UserRef
    to_island: IslandId


class MoveOut(Frozen):
    moved: bool


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
