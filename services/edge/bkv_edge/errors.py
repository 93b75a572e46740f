"""What the device's side of the Noise channel raises (protocol/src/bkv_protocol/noise.py).

::

    EdgeError
    ├── HandshakeFailed     the edge did not prove the pinned key
    └── BadMessage          the edge's answer failed authentication or is not padded as agreed

The edge's own refusals are JSON answers with these codes (the processor's
tree: services/edge/noise-processor/errors.go; docs/edge.md):
``400 noise_handshake_failed``, ``401 noise_session_unknown`` (handshake
again), ``400 noise_bad_message`` (the session is closed) and ``404 not_found``.
"""


class EdgeError(Exception):
    code = "noise_error"


class HandshakeFailed(EdgeError):
    code = "noise_handshake_failed"


class BadMessage(EdgeError):
    code = "noise_bad_message"
