"""Wire types of a vault island (called by the frontend).

The responses are exactly what the client receives; the frontend passes
them through. Requests carry the user id the frontend authenticated.
"""

from __future__ import annotations

from bkv_common.wire import B64, Frozen
from bkv_hsm_proxy.api import IslandId, RecordStatus, UserId, UserRef


class RegistrationStartIn(Frozen):
    user_id: UserId
    registration_request: B64


class RegistrationStartOut(Frozen):
    registration_response: B64
    challenge: B64
    signature: B64


class RegistrationFinishIn(Frozen):
    user_id: UserId
    challenge: B64
    registration_upload: B64
    ek: B64
    k_nonce: B64


class RegistrationFinishOut(Frozen):
    version: int
    max_attempts: int
    signature: B64


class RecoveryStartIn(Frozen):
    user_id: UserId
    credential_request: B64


class RecoveryStartOut(Frozen):
    """``attempts_left`` is what remains *after* this guess; it is signed."""

    credential_response: B64
    login_state: B64
    attempts_left: int
    signature: B64


class RecoveryFinishIn(Frozen):
    user_id: UserId
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


class ListRefsIn(Frozen):
    """Admin: which users have an entry on this island."""


class ListRefsOut(Frozen):
    user_refs: list[str]
