"""Exceptions of a vault island, mapped to HTTP in ``app.py``.

::

    IslandError
    ├── NoRecord            404 no_record        -- never registered (or deleted and gone)
    ├── RecordDestroyed     410 record_destroyed -- attempts ran out, or disabled
    ├── Contended           409 conflict         -- lost every compare-and-swap until the deadline
    ├── StoreUnavailable    503 unavailable      -- etcd unreachable; nothing was written, try again
    └── OutcomeUnknown      502 outcome_unknown  -- a write may or may not have landed; not retried,
                                                    the client must treat the attempt as maybe counted

Errors from the hsm-proxy arrive as ``bkv_common.http.UpstreamError`` and are
passed on unchanged; ``UpstreamUnavailable`` becomes 503.
"""


class IslandError(Exception):
    pass


class NoRecord(IslandError):
    pass


class RecordDestroyed(IslandError):
    pass


class Contended(IslandError):
    pass


class StoreUnavailable(IslandError):
    pass


class OutcomeUnknown(IslandError):
    """etcd lost the answer to a write and could not be asked whether it
    landed. Retrying could count one guess twice, so the client is told."""
