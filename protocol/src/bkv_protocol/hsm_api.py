"""Wire types of the hsm-proxy (called only by vault islands).

Kept apart from the logic in ``core.py``. Every binary field is base64 on
the wire. Every state change is an op of a batch applied to the island's
log (``ApplyIn``), with the record the island says is current and its proof
against the log's head; what a client may use comes back *held*, and leaves
only through ``ReleaseIn`` (or a capture's ``ReleaseAsk``) once a quorum of
hsm-proxies captured the entry (docs/protocol.md, "The HSM-held log").
"""

from __future__ import annotations

import enum
import hashlib
from typing import Annotated

from pydantic import ConfigDict, Field, StringConstraints

from bkv_protocol import labels
from bkv_protocol.encoding import canonical, u64
from bkv_protocol.ids import EK_LEN, K_NONCE_LEN, FleetId, IslandId, RequestIdHex, UserId, UserRef  # noqa: F401  (re-exported for the hop's users)
from bkv_protocol import v1
from bkv_protocol.v1 import FleetParams, RecordStatus  # noqa: F401  (public; the hsm-proxy makes them)
from bkv_protocol.wire import B64, ErrorDetail, Frozen, RequestId, SignedState, fixed_b64, hop


class EntryState(str, enum.Enum):
    ABSENT = "absent"        # never registered
    LIVE = "live"            # a sealed record
    DESTROYED = "destroyed"  # tombstone: attempts ran out or the user disabled it
    MOVED = "moved"          # moved to ``Entry.moved_to``; ``sealed`` is the record sealed for that island


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
    moved_to: IslandId | None = Field(None, exclude_if=lambda v: v is None)  # state MOVED only
    # The account's event chain after this entry's change (``transcripts.event_chain``),
    # computed by the boundary and proven by the log like every field here (``entry_digest``);
    # kept by tombstones and moves, so the feed outlives the record. None: no event yet
    # (every entry written before the feed), read as ``transcripts.EVENTS_EMPTY``.
    events_head: fixed_b64(32) | None = Field(None, exclude_if=lambda v: v is None)

    def answered(self) -> list[str]:
        """The request ids the entry that follows this one must remember."""
        ids = self.recent + ([self.request.id] if self.request is not None else [])
        return ids[-RECENT_REQUESTS:]


def entry_digest(entry: Entry | None) -> bytes | None:
    """A record's leaf value in the trie: every field of its etcd entry,
    canonically (None: the user has no entry on this island)."""
    if entry is None or entry.state is EntryState.ABSENT:
        return None
    req = entry.request
    return hashlib.sha256(canonical(
        labels.LOG_RECORD, entry.state.value.encode(), u64(entry.version), entry.sealed or b"",
        (entry.fleet_id or "").encode(),
        b"" if req is None else canonical(b"", req.id.encode(), req.fingerprint.encode(), req.reply),
        ",".join(entry.recent).encode(), (entry.moved_to or "").encode(),
        # Only when set: entries written before the feed keep the digest they were logged with.
        *(() if entry.events_head is None else (entry.events_head,)))).digest()


# -- the client operations (bkv_protocol.operations) ------------------------------
# The public body as the client sent it, the user the frontend authenticated,
# the island asking and the entry it read (``bkv_protocol.wire.hop``): the
# fleet the client pinned (``fleet_id``) signs the answer.
def _from_island(name: str, body: type[Frozen]) -> type[Frozen]:
    return hop(name, body, f"{body.__name__}, the user, the island asking and the entry it read.", __name__,
               user_id=(UserId, ...), island=(IslandId, ...), current=(Entry, ...))


RegistrationStartIn = _from_island("RegistrationStartIn", v1.RegistrationStartRequest)
RegistrationStartOut = v1.RegistrationStartOut
RegistrationFinishIn = _from_island("RegistrationFinishIn", v1.RegistrationFinishRequest)
RecoverStartIn = _from_island("RecoverStartIn", v1.RecoverStartRequest)
RecoverFinishIn = _from_island("RecoverFinishIn", v1.RecoverFinishRequest)
DeleteIn = _from_island("DeleteIn", v1.DeleteRequest)
EventsIn = _from_island("EventsIn", v1.EventsRequest)  # read inside EventsReadIn, with its proof


# -- resends and refusals --------------------------------------------------------
class ReplyOpenIn(Frozen):
    """A resend of the request that wrote ``current``: open its sealed answer,
    if ``current`` is in a committed head (a quorum's statements for it)."""

    user_id: UserId
    island: IslandId
    current: Entry
    proven: Proven
    statements: list[Statement] = Field(max_length=16)
    request_id: RequestId
    fingerprint: B64  # bkv_protocol.transcripts.*_request, as the island computed it


class ReplyOpenOut(Frozen):
    reply: B64  # the JSON answer exactly as first committed


class RefusalIn(Frozen):
    """No live record: sign ``no_record`` or ``record_destroyed`` (decided by
    ``current.state``). Without a request named: over the record's state
    (``bkv_protocol.transcripts.state_answer``: user, island, version), made
    once per state. With one (islands built before): for that one request,
    whose fingerprint the boundary computes itself from ``user_id``,
    ``route``, ``request_id`` and ``fields``
    (``bkv_protocol.transcripts.refusable_request``). Either way a refusal
    proven for one user never answers another user's request."""

    user_id: UserId
    island: IslandId
    fleet_id: FleetId | None = None
    current: Entry
    proven: Proven
    statements: list[Statement] = Field(max_length=16)  # a quorum's, for proven.head: a committed state
    route: str | None = None  # bkv_protocol.transcripts.Route
    request_id: RequestId | None = None
    fields: list[B64] = Field([], max_length=4)  # the request's own fields, in fingerprint order


class RefusalOut(Frozen):
    code: str  # bkv_protocol.transcripts.Refusal
    signature: B64
    state: SignedState | None = None  # the per-state form: what the signature covers besides user and code


class EventsReadIn(Frozen):
    """Sign the account's event feed head: ``read.current`` proven against a
    committed head (a quorum's statements), so the version and chain head
    signed are the account's newest committed ones. The events themselves
    never pass here: the device checks that they chain to the signed head."""

    read: EventsIn
    proven: Proven
    statements: list[Statement] = Field(max_length=16)


class EventsSigned(Frozen):
    version: int = Field(ge=0, le=2**63 - 1)
    head: fixed_b64(32)
    signature: B64


# -- rotation ---------------------------------------------------------------------
class MigrateIn(Frozen):
    """Rotation: re-seal one record under ``to_fleet``'s keys, attempts intact."""

    user_ref: UserRef
    island: IslandId
    current: Entry
    to_fleet: FleetId


# -- the HSM-held log (bkv_hsm_proxy/log.py, docs/protocol.md) ---------------------
Mac = fixed_b64(32)
HsmId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9\-]{0,62}$")]


class LogEntry(Frozen):
    """One link of an island's log, MAC'd by the boundary."""

    island: IslandId
    index: int = Field(ge=0, le=2**63 - 1)
    root: Mac  # the island's trie root after this entry
    prev_mac: Mac
    salt: fixed_b64(16)
    mac: Mac


class Statement(Frozen):
    """An hsm-proxy's MAC'd statement that it captured ``(island, index, mac)``."""

    hsm: HsmId
    island: IslandId
    index: int = Field(ge=0, le=2**63 - 1)
    mac: Mac
    tag: Mac


class Proven(Frozen):
    """A record's entry and its trie proof against ``head`` (the island's
    newest log entry): what every request that reads or changes a record
    carries, so that the boundary, not etcd, decides what is current."""

    head: LogEntry
    proof: B64  # bkv_protocol.merkle.Proof.to_bytes()


class OpKind(str, enum.Enum):
    REGISTRATION_FINISH = "registration_finish"
    # A recovery is OPAQUE's login phase: the values are the island <-> hsm-proxy
    # wire strings of the build before the catalogue, kept so either tier may roll first.
    RECOVER_START = "login_start"
    RECOVER_FINISH = "login_finish"
    MIGRATE = "migrate"
    DELETE = "delete"
    MOVE_OUT = "move_out"
    MOVE_IN = "move_in"


class MoveOutIn(Frozen):
    """Leave ``island`` for ``to_island``: the entry becomes MOVED, carrying
    the record sealed for its destination, attempts intact."""

    user_ref: UserRef
    island: IslandId
    current: Entry
    to_island: IslandId


class MoveInIn(Frozen):
    """Arrive on ``island`` from a *committed* MOVED entry of another island:
    that island's head, a quorum's capture statements for it, and the MOVED
    entry's proof against it."""

    user_ref: UserRef
    island: IslandId
    current: Entry
    moved: Entry
    from_head: LogEntry
    from_statements: list[Statement] = Field(max_length=16)
    from_proof: B64


class Op(Frozen):
    """One state change of a batch; exactly the field named by ``kind`` is set."""

    # On the wire each body is under its kind's value (``OpKind``: v1's strings).
    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    kind: OpKind
    proof: B64  # of this op's record against the batch's head
    registration_finish: RegistrationFinishIn | None = None
    recover_start: RecoverStartIn | None = Field(None, alias=OpKind.RECOVER_START.value)
    recover_finish: RecoverFinishIn | None = Field(None, alias=OpKind.RECOVER_FINISH.value)
    migrate: MigrateIn | None = None
    delete: DeleteIn | None = None
    move_out: MoveOutIn | None = None
    move_in: MoveInIn | None = None

    def body(self):
        return getattr(self, _OP_FIELD.get(self.kind, self.kind.value))


_OP_FIELD = {OpKind.RECOVER_START: "recover_start", OpKind.RECOVER_FINISH: "recover_finish"}


class ApplyIn(Frozen):
    head: LogEntry
    ops: list[Op] = Field(min_length=1, max_length=64)


class OpResult(Frozen):
    """Either the op's next entry (and, if a client waits for it, its answer
    *held*: sealed to the boundary until the entry is committed) or why it
    was refused (nothing changed), with the status the refusal maps to."""

    new_entry: Entry | None = None
    held: B64 | None = None
    status: int = 200
    error: ErrorDetail | None = None
    # The account's event for this change (not secret), stored by the island
    # beside the entry, in the same transaction. Left out when None: the old shape.
    event: v1.Event | None = Field(None, exclude_if=lambda v: v is None)


class ApplyOut(Frozen):
    entry: LogEntry | None  # None: every op was refused, nothing to append
    results: list[OpResult]


class ReleaseAsk(Frozen):
    """Release riding on a capture: the held answers of the capture's last
    entry, and the other hsm-proxies' statements for it known so far."""

    statements: list[Statement] = Field(default_factory=list, max_length=16)
    held: list[B64] = Field(max_length=64)


class CaptureIn(Frozen):
    entries: list[LogEntry] = Field(min_length=1, max_length=256)  # oldest first, one island
    # Set: once captured, release ``entries[-1]``'s held answers if this
    # hsm-proxy's statement and the given ones make a quorum (one call less).
    # Left out when None: the old shape, for hsm-proxies that refuse unknown fields.
    release: ReleaseAsk | None = Field(None, exclude_if=lambda v: v is None)


class CaptureOut(Frozen):
    statement: Statement
    # In the order of ``release.held``; None (left out: the old shape): no
    # release asked, or no quorum yet: release in a call of its own.
    answers: list[B64] | None = Field(None, exclude_if=lambda v: v is None)


class ReleaseIn(Frozen):
    entry: LogEntry
    statements: list[Statement] = Field(max_length=16)
    held: list[B64] = Field(max_length=64)


class ReleaseOut(Frozen):
    answers: list[B64]  # in the order of ``held``


class GenesisIn(Frozen):
    island: IslandId


class LogHead(Frozen):
    index: int
    mac: Mac


class FreezeIn(Frozen):
    """The admin's signed order to freeze the set of ``epoch`` (bkv_protocol.members.FreezeOrder)."""

    epoch: int = Field(ge=1, le=2**31)
    admin_public_key: B64
    signature: B64


class FrozenHead(Frozen):
    index: int = Field(ge=0, le=2**63 - 1)
    mac: Mac
    root: Mac


class FreezeOut(Frozen):
    """``hsm``, a member of the set of ``epoch``, froze at ``heads`` (MAC'd by
    the boundary): what the next set's heads are chosen from and checked against."""

    hsm: HsmId
    epoch: int = Field(ge=1, le=2**31)
    heads: dict[IslandId, FrozenHead] = Field(max_length=4096)
    tag: Mac


class LogHeadsOut(Frozen):
    """What this hsm-proxy captured, per island (admin)."""

    hsm: HsmId
    members: list[HsmId]
    quorum: int
    heads: dict[str, LogHead]
    epoch: int = 1      # of the member set this hsm-proxy serves in
    frozen: bool = False  # for a change of the set: it captures nothing until it adopts the next


# -- the island set (bkv_protocol.islands) ------------------------------------------
class IslandSetIn(Frozen):
    """An island set signed by the admin key (``SignedIslandSet.to_json``),
    for the token to store as its next one. The signature is its authority:
    anyone may deliver it."""

    island_set: str = Field(max_length=32_768)


class IslandSetOut(Frozen):
    """The token's newest island set (signed, as stored), and whether this
    call stored the one it delivered."""

    epoch: int = Field(ge=0, le=2**31)  # 0: the token holds none
    island_set: str | None = None
    stored: bool = False
