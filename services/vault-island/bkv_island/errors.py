"""Exceptions of a vault island, and ``TABLE``: how each is answered over HTTP.

::

    IslandError                   -- a base; raised bare only by a bug (500)
    ├── Refused                   -- a base: carries the fleet's signature for this record state
    │   ├── NoRecord              -- never registered (or deleted and gone)
    │   └── RecordDestroyed       -- attempts ran out, or disabled
    ├── Contended                 -- lost every compare-and-swap until the deadline
    ├── RequestIdReused           -- this request id came with another body; nothing done
    ├── RequestSuperseded         -- a resend of a request whose answer is gone (a later
    │                                change landed): nothing done, start again
    ├── StoreUnavailable          -- etcd unreachable; nothing was written, try again
    ├── Moved                     -- the record left for another island: ask again (the map moved)
    ├── LedgerDiverged            -- etcd is behind the HSM boundary or does not add up to the
    │                                log head: fail closed until etcd is restored
    └── OutcomeUnknown            -- a write may or may not have landed; resend the same
                                     request (same id): it is answered from the commit

Over a per-account limit, ``bkv_server.ratelimit.RateLimited`` (429
``rate_limited``, with the wait in the body): nothing was done.

Errors from the hsm-proxy arrive as ``bkv_server.http.UpstreamError`` and are
passed on unchanged (every ``ErrorTable`` does); ``UpstreamUnavailable`` is 503.
"""

from bkv_protocol.wire import ErrorCode as C
from bkv_server.http import UpstreamUnavailable
from bkv_server.ratelimit import RateLimited
from bkv_server.rpc import ErrorTable


class IslandError(Exception):
    pass


class Refused(IslandError):
    """No live record. ``signature`` is the fleet's over the record's state
    (``bkv_protocol.transcripts.state_answer``), from the hsm-proxy, and
    ``signed_state`` what it covers; None only where no request is being
    answered (admin paths)."""

    def __init__(self, message: str, signature: bytes | None = None, signed_state=None) -> None:
        super().__init__(message)
        self.signature = signature
        self.signed_state = signed_state


class NoRecord(Refused):
    pass


class RecordDestroyed(Refused):
    pass


class RequestIdReused(IslandError):
    """A request id seen before, with a different body: refused, nothing done."""


class RequestSuperseded(IslandError):
    """A resend of an earlier request whose answer is no longer kept (a later
    change landed since): refused rather than evaluated again, so it never
    spends an attempt. The client starts the operation over."""


class Contended(IslandError):
    pass


class StoreUnavailable(IslandError):
    pass


class Moved(IslandError):
    pass


class LedgerDiverged(IslandError):
    """etcd shows a log older than the boundary captured, or records that do
    not add up to the head: never reset, never obeyed (docs/reliability.md)."""


class OutcomeUnknown(IslandError):
    """etcd lost the answer to a write and could not be asked whether it
    landed. A resend of the same request (same id) settles it: answered from
    the commit if it landed, evaluated if it did not."""


TABLE = ErrorTable(
    (NoRecord, C.NO_RECORD, False),
    (RecordDestroyed, C.RECORD_DESTROYED, False),
    (Contended, C.CONFLICT, True),
    (RequestIdReused, C.REQUEST_ID_REUSED, False),
    (RequestSuperseded, C.REQUEST_SUPERSEDED, False),
    (StoreUnavailable, C.UNAVAILABLE, True),
    (Moved, C.UNAVAILABLE, True, "the record moved to another island; try again"),
    (LedgerDiverged, C.LOG_DIVERGED, False, "the record store is behind the HSM boundary; the vault is closed "
                                                 "until the operator restores it"),
    (OutcomeUnknown, C.OUTCOME_UNKNOWN, True),
    (UpstreamUnavailable, C.UNAVAILABLE, True, "the HSM is unreachable; try again shortly"),
    (RateLimited, C.RATE_LIMITED, True),
)
