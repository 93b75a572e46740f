"""Exceptions of the hsm-proxy, mapped to HTTP in ``app.py`` (one place).

::

    HsmProxyError
    ├── BadRequest                   400 invalid_request
    │   ├── MalformedOpaqueMessage   400 malformed_opaque_message
    │   └── UnknownFleet             400 invalid_request (the pinned fleet is not, or no longer, here)
    ├── ChallengeRejected            400 challenge_rejected (expired, replayed, foreign)
    ├── LoginStateRejected           400 login_state_rejected (expired, used, foreign)
    ├── AuthenticationFailed         403 authentication_failed (the one wrong-password error)
    ├── RecordIntegrityFailure       500 record_integrity_failure (sealed record will not open)
    ├── RecordDestroyed              410 record_destroyed
    └── HsmError                     503 unavailable -- the token misbehaved
        ├── HsmKeyMissing            (fleet-init was not run)
        ├── HsmLoginFailed           (wrong PIN: never tried again, a real HSM locks it)
        ├── HsmTokenUnavailable      (any other failure while opening -- no token, a
        │                             general error, "PIN not initialized": SoftHSM2
        │                             processes opening one token at once; open_token
        │                             tries again for a few seconds)
        └── HsmAuthTagMismatch       (AES-GCM tag check failed: raised by unseal,
                                      turned into one of the rejections above)
"""


class HsmProxyError(Exception):
    pass


class BadRequest(HsmProxyError):
    pass


class MalformedOpaqueMessage(BadRequest):
    pass


class UnknownFleet(BadRequest):
    """The request names a fleet this token does not hold (retired, or never
    here): the client should fetch the current validation bundle."""


class ChallengeRejected(HsmProxyError):
    pass


class LoginStateRejected(HsmProxyError):
    pass


class AuthenticationFailed(HsmProxyError):
    """The credential finalization did not verify: wrong password, or a
    forged message. Deliberately says nothing more."""


class RecordIntegrityFailure(HsmProxyError):
    pass


class RecordDestroyed(HsmProxyError):
    pass


class HsmError(HsmProxyError):
    pass


class HsmKeyMissing(HsmError):
    pass


class HsmLoginFailed(HsmError):
    pass


class HsmTokenUnavailable(HsmError):
    """The token could not be opened just now, for a reason other than the PIN.
    With SoftHSM2 this happens while other processes open the same token
    directory (a login rewrites the token's file: a reader may find no token,
    a general error, or no user PIN), and passes within moments."""


class HsmAuthTagMismatch(HsmError):
    pass
