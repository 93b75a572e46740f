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

from bkv_protocol.ids import EK_LEN, K_NONCE_LEN, FleetId, IslandId, RequestIdHex, UserId, UserRef  # noqa: F401  (re-exported for the hop's users)
from bkv_protocol.v1 import FleetParams, RecordStatus  # noqa: F401  (public; the hsm-proxy makes them)
from bkv_protocol.wire import B64, Frozen, RequestId


class EntryState(str, enum.Enum):
    ABSENT = "absent"        # never registered
    LIVE = "live"            # a sealed record
    DESTROYED = "destroyed"  # tombstone: attempts ran out or the user disabled it


RECENT_REQUESTS = 16  # request ids an entry remembers after their answer is gone


class LastRequest(Frozen):
    """The request that wrote this entry, and its answer sealed by the HSM
    (``bkv_protocol.transcripts.reply_aad``): a resend of it -- same id, same
    fingerprint -- is answered from here by any replica instead of being
    evaluated again, so a resend never spends an attempt."""

    id: RequestIdHex
    fingerprint: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    reply: B64


class Entry(Frozen):
    """A user's etcd entry as the island read it. ``version`` grows by one on
    every change and survives destruction, so sealed challenges and login
    states bound to it are single use."""

    state: EntryState
    version: int = Field(ge=0, le=2**63 - 1)  # +1 still fits the u64 it is sealed and signed as
    sealed: B64 | None = None
    fleet_id: FleetId | None = None  # the fleet whose keys sealed it (None: the oldest)
    # Not sealed: they only ever decide whether a request was answered
    # already, never what the record says (the HSM-boundary issue, #17, moves
    # that decision inside the boundary).
    request: LastRequest | None = None
    # Ids of earlier requests whose answers are gone: a resend of one is
    # refused (request_superseded), never evaluated again.
    recent: list[RequestIdHex] = Field(default_factory=list, max_length=RECENT_REQUESTS)

    def answered(self) -> list[str]:
        """The request ids the entry that follows this one must remember."""
        ids = self.recent + ([self.request.id] if self.request is not None else [])
        return ids[-RECENT_REQUESTS:]


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
    request_id: RequestId
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
    request_id: RequestId
    current: Entry
    credential_request: B64


class LoginStartOut(Frozen):
    """Commit ``new_entry`` first; only then may the rest reach the client."""

    new_entry: Entry
    attempts_left: int = Field(ge=0, le=1000)
    credential_response: B64
    login_state: B64
    signature: B64


class LoginFinishIn(Frozen):
    user_id: UserId
    island: IslandId
    fleet_id: FleetId | None = None  # the fleet the client pinned; it signs the answer
    request_id: RequestId
    current: Entry
    login_state: B64
    credential_finalization: B64


class LoginFinishOut(Frozen):
    new_entry: Entry
    wrapped_key: B64
    rk_nonce: B64
    record_status: RecordStatus
    signature: B64


# -- resends and refusals --------------------------------------------------------
class ReplyOpenIn(Frozen):
    """A resend of the request that wrote ``current``: open its sealed answer."""

    user_id: UserId
    island: IslandId
    current: Entry
    request_id: RequestId
    fingerprint: B64  # bkv_protocol.transcripts.*_request, as the island computed it


class ReplyOpenOut(Frozen):
    reply: B64  # the JSON answer exactly as first committed


class RefusalIn(Frozen):
    """No live record for a login: sign ``no_record`` or ``record_destroyed``
    (decided by ``current.state``) for this one request."""

    user_id: UserId
    island: IslandId
    fleet_id: FleetId | None = None
    current: Entry
    fingerprint: B64


class RefusalOut(Frozen):
    code: str  # bkv_protocol.transcripts.Refusal
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
