"""Exceptions of the witness, and ``TABLE``: how each is answered over HTTP.

::

    WitnessError                -- a base; raised bare only by a bug (500)
    └── WitnessRefused          the bundle does not extend the log (fork, gap, replay
                                of an older one) or is not operator-signed

A bundle that does not parse or verify raises ``bkv_protocol.bundle.BundleError``.
"""

from bkv_protocol import bundle as bd
from bkv_protocol.wire import ErrorCode as C
from bkv_server.rpc import ErrorTable


class WitnessError(Exception):
    pass


class WitnessRefused(WitnessError):
    """Not countersigned; the message says why. The operator must publish a
    bundle that extends the witness log (GET /witness/v1/log)."""


TABLE = ErrorTable(
    (WitnessRefused, C.CONFLICT, False),  # a fork or a rollback: never countersigned
    (bd.BundleError, C.INVALID_REQUEST, False),
)
