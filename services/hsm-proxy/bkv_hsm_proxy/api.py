"""Wire types of the hsm-proxy (called only by vault islands).

Kept apart from the logic in ``core.py``. Every binary field is base64 on
the wire. The island passes the user's current etcd entry; the proxy answers
with the entry the island must commit (compare-and-swap) *before* it may
release the client-facing part of the answer.
"""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import Field, StringConstraints

from bkv_common.wire import B64, Frozen

UserId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._@+\-]{1,128}$")]
IslandId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9\-]{0,62}$")]
UserRef = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]  # bkv_common.encoding.user_ref
FleetId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]  # bkv_common.encoding.fleet_id_for


class EntryState(str, enum.Enum):
    ABSENT = "absent"        # never registered
    LIVE = "live"            # a sealed record
    DESTROYED = "destroyed"  # tombstone: attempts ran out or the user disabled it


class Entry(Frozen):
    """A user's etcd entry as the island read it. ``version`` grows by one on
    every change and survives destruction, so sealed challenges and login
    states bound to it are single use."""

    state: EntryState
    version: int = Field(ge=0, le=2**63 - 1)  # +1 still fits the u64 it is sealed and signed as
    sealed: B64 | None = None
    fleet_id: FleetId | None = None  # the fleet whose keys sealed it (None: the oldest)
    # Set by the island on what it writes: the writing request's tag, so a retry
    # can tell that a write whose answer was lost did land. Not sealed: it only
    # ever decides whether to answer again, never what the record says.
    tag: str | None = Field(None, max_length=32)


# -- registration --------------------------------------------------------------
class RegistrationStartIn(Frozen):
    user_id: UserId
    island: IslandId
    fleet_id: FleetId | None = None  # the fleet the client pinned; it signs the answer
    current: Entry
    registration_request: B64


class RegistrationStartOut(Frozen):
    registration_response: B64
    challenge: B64
    signature: B64


class RegistrationFinishIn(Frozen):
    user_id: UserId
    island: IslandId
    fleet_id: FleetId | None = None  # the fleet the client pinned; it signs the answer
    current: Entry
    challenge: B64
    registration_upload: B64
    ek: B64
    k_nonce: B64


class RegistrationFinishOut(Frozen):
    new_entry: Entry
    max_attempts: int = Field(ge=1, le=1000)  # settings.max_attempts' range
    signature: B64


# -- login ---------------------------------------------------------------------
class LoginStartIn(Frozen):
    user_id: UserId
    island: IslandId
    fleet_id: FleetId | None = None  # the fleet the client pinned; it signs the answer
    current: Entry
    credential_request: B64


class LoginStartOut(Frozen):
    """Commit ``new_entry`` first; only then may the rest reach the client."""

    new_entry: Entry
    attempts_left: int = Field(ge=0, le=1000)
    credential_response: B64
    login_state: B64
    signature: B64


class RecordStatus(str, enum.Enum):
    RESET = "reset"          # attempts back to the maximum
    DESTROYED = "destroyed"  # the last attempt was used; the client should register again


class LoginFinishIn(Frozen):
    user_id: UserId
    island: IslandId
    fleet_id: FleetId | None = None  # the fleet the client pinned; it signs the answer
    current: Entry
    login_state: B64
    credential_finalization: B64


class LoginFinishOut(Frozen):
    new_entry: Entry
    wrapped_key: B64
    rk_nonce: B64
    record_status: RecordStatus
    signature: B64


# -- records moving between islands (issue: resilience) ------------------------
class ResealIn(Frozen):
    user_ref: UserRef
    from_island: IslandId
    to_island: IslandId
    current: Entry


class ResealOut(Frozen):
    new_entry: Entry


class MigrateIn(Frozen):
    """Rotation: re-seal one record under ``to_fleet``'s keys, attempts intact."""

    user_ref: UserRef
    island: IslandId
    current: Entry
    to_fleet: FleetId


# -- fleet ---------------------------------------------------------------------
class FleetParams(Frozen):
    """What clients pin and what the frontend publishes. Never the OPAQUE setup."""

    fleet_id: str
    fleet_public_key: B64  # SubjectPublicKeyInfo DER, ECDSA P-256
    max_attempts: int = Field(ge=1, le=1000)
    opaque_suite: str = "ristretto255-tripledh-argon2id"
    signature_alg: str = "ecdsa-p256-sha256"
