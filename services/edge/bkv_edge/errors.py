"""Exceptions of the Noise edge; each becomes an immediate 4xx from Envoy.

::

    EdgeError
    ├── HandshakeFailed     400 noise_handshake_failed -- not for our key, or malformed
    ├── UnknownSession      401 noise_session_unknown  -- expired or never existed: handshake again
    ├── BadMessage          400 noise_bad_message      -- tampered, replayed or malformed: session closed
    └── NotNoise            404 not_found              -- only the Noise paths are served
"""


class EdgeError(Exception):
    status = 400
    code = "noise_error"


class HandshakeFailed(EdgeError):
    status, code = 400, "noise_handshake_failed"


class UnknownSession(EdgeError):
    status, code = 401, "noise_session_unknown"


class BadMessage(EdgeError):
    status, code = 400, "noise_bad_message"


class NotNoise(EdgeError):
    status, code = 404, "not_found"
