"""Wire types of a vault island (called by the frontend).

Requests carry the user id the frontend authenticated. The answers to the
client-facing operations are the public v1 answers themselves
(``bkv_protocol.v1``), which the frontend relays unchanged: they are defined
there, once, so the public API changes only where it is written down.
"""

from __future__ import annotations

from pydantic import Field

from bkv_protocol import v1
from bkv_protocol.hsm_api import Entry, LogEntry, Statement
from bkv_protocol.ids import FleetId, IslandId, UserId, UserRef
from bkv_protocol.v1 import (  # noqa: F401  (the island's answers: see above)
    DeleteOut,
    EventsOut,
    RecoverFinishOut,
    RecoverStartOut,
    RegistrationFinishOut,
    RegistrationStartOut,
)
from bkv_protocol.wire import B64, Frozen, fixed_b64, hop


# The client operations' requests: the public body and the account the
# frontend authenticated (``bkv_protocol.wire.hop``; the catalogue names them).
def _from_frontend(name: str, body: type[Frozen]) -> type[Frozen]:
    # ``legacy``: the request came by a route of clients built before the catalogue
    # (bkv_protocol.operations, ``aliases``), which verify a refusal only in its
    # per-request form: theirs are signed so (docs/protocol.md, "Refusals").
    return hop(name, body, f"{body.__name__} and the user the frontend authenticated.", __name__,
               user_id=(UserId, ...), legacy=(bool, Field(False, exclude_if=lambda v: not v)))


RegistrationStartIn = _from_frontend("RegistrationStartIn", v1.RegistrationStartRequest)
RegistrationFinishIn = _from_frontend("RegistrationFinishIn", v1.RegistrationFinishRequest)
RecoverStartIn = _from_frontend("RecoverStartIn", v1.RecoverStartRequest)
RecoverFinishIn = _from_frontend("RecoverFinishIn", v1.RecoverFinishRequest)
DeleteIn = _from_frontend("DeleteIn", v1.DeleteRequest)
EventsIn = _from_frontend("EventsIn", v1.EventsRequest)


class MoveIn(Frozen):
    """Admin: move a user's record from this island to ``to_island``."""

    user_ref: UserRef
    to_island: IslandId


class MoveOut(Frozen):
    moved: bool


class StoredEvent(Frozen):
    """An account's event as an island keeps it (``bkv_island.store``), with
    the account's chain head before it (what a device checks the first event
    it is shown from)."""

    event: v1.Event
    before: fixed_b64(32)


class MoveInIn(Frozen):
    """Island to island: the record arrives from ``moved``, a MOVED entry its
    island committed (its head, a quorum's statements, the entry's proof),
    and its account's feed with it: ``events``, the old island's kept events
    (oldest first), stored by the new one only if they chain to the moved
    entry's events head (a device checks them again when it reads them)."""

    user_ref: UserRef
    moved: Entry
    from_head: LogEntry
    from_statements: list[Statement] = Field(max_length=16)
    from_proof: B64
    events: list[StoredEvent] = Field(default_factory=list, max_length=1024)


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
