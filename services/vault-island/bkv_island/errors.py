"""Exceptions of a vault island, mapped to HTTP in ``app.py``.

::

    IslandError
    ├── Refused                                  -- carries the fleet's signature for this request
    │   ├── NoRecord        404 no_record        -- never registered (or deleted and gone)
    │   └── RecordDestroyed 410 record_destroyed -- attempts ran out, or disabled
    ├── Contended           409 conflict         -- lost every compare-and-swap until the deadline
    ├── RequestIdReused     409 request_id_reused -- this request id came with another body; nothing done
    ├── RequestSuperseded   409 request_superseded -- a resend of a request whose answer is gone (a
    │                                               later change landed): nothing done, start again
    ├── StoreUnavailable    503 unavailable      -- etcd unreachable; nothing was written, try again
    └── OutcomeUnknown      502 outcome_unknown  -- a write may or may not have landed; resend the same
                                                    request (same id): it is answered from the commit

Errors from the hsm-proxy arrive as ``bkv_server.http.UpstreamError`` and are
passed on unchanged; ``UpstreamUnavailable`` becomes 503.
"""


class IslandError(Exception):
    pass


class Refused(IslandError):
    """No live record. ``signature`` is the fleet's over (request, outcome),
    from the hsm-proxy (``bkv_protocol.transcripts.refusal_answer``); None only
    where no request is being answered (admin paths)."""

    def __init__(self, message: str, signature: bytes | None = None) -> None:
        super().__init__(message)
        self.signature = signature


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


class OutcomeUnknown(IslandError):
    """etcd lost the answer to a write and could not be asked whether it
    landed. A resend of the same request (same id) settles it: answered from
    the commit if it landed, evaluated if it did not."""
