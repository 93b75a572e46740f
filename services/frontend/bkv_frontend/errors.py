"""Exceptions of the frontend, and ``TABLE``: how each is answered over HTTP.

::

    FrontendError               -- a base; raised bare only by a bug (500)
    ├── Unauthenticated         missing, malformed, expired or foreign token (the message is uniform)
    └── NotReady                the island map or the fleet parameters are not known yet

Over a per-device limit, ``bkv_server.ratelimit.RateLimited`` (429
``rate_limited``, the wait in the body and in Retry-After); an island's
per-account 429 is an UpstreamError, passed on unchanged.

Calls to the islands raise ``bkv_server.http``'s::

    UpstreamError               an island's own error answer: passed on unchanged
    UpstreamUnavailable         no replica of the island answered
    └── UpstreamOutcomeUnknown  the connection broke mid-request: it may have landed

Answers from this table carry ``Retry-After`` when retryable and
``WWW-Authenticate`` on 401 (``bkv_frontend.app``); the public schema's
error statuses and codes come from it and the islands' and hsm-proxy's
tables (``bkv_frontend.openapi``).
"""

from bkv_protocol.wire import ErrorCode as C
from bkv_server.http import UpstreamOutcomeUnknown, UpstreamUnavailable
from bkv_server.ratelimit import RateLimited
from bkv_server.rpc import ErrorTable


class FrontendError(Exception):
    pass


class Unauthenticated(FrontendError):
    """Missing, malformed, expired or foreign token. The message is uniform."""


class NotReady(FrontendError):
    pass


# Fixed messages: the exceptions' own would name replicas and internals, or be empty.
TABLE = ErrorTable(
    (Unauthenticated, C.UNAUTHENTICATED, False, "a valid account token is required"),
    (UpstreamOutcomeUnknown, C.OUTCOME_UNKNOWN, False,
     "the vault lost the connection mid-request; this attempt may or may not have been counted"),
    (UpstreamUnavailable, C.UNAVAILABLE, True, "the vault is temporarily unavailable; retry shortly"),
    (NotReady, C.UNAVAILABLE, True, "the vault is starting; retry shortly"),
    (RateLimited, C.RATE_LIMITED, True),
)
