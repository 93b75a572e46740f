"""Exceptions of the hsm-proxy, and ``TABLE``: how each is answered over HTTP.

::

    HsmProxyError                -- a base; raised bare only by a bug (500)
    ├── BadRequest               -- the request is wrong as sent
    │   ├── MalformedOpaqueMessage
    │   ├── UnknownFleet         (the pinned fleet is not, or no longer, here)
    │   └── IslandSetRefused     (an island set the token does not store: another key, a skipped epoch, ...)
    ├── ChallengeRejected        (expired, replayed, foreign)
    ├── LoginStateRejected       (expired, used, foreign)
    ├── PasswordProofRequired    (replacing or deleting a live escrow without a change ticket)
    ├── TicketRejected           (the change ticket or its proof: expired, used, foreign, forged)
    ├── AuthenticationFailed     (the one wrong-password error)
    ├── RecordIntegrityFailure   (sealed record will not open)
    ├── RecordDestroyed
    ├── TooEarly                 (a recover start before the record's not-before time: signed, nothing spent)
    ├── WrongIsland              (the signed island set does not place the user's record here alone:
    │   │                         no refusal signed, no record made; the frontend re-reads the map)
    │   └── NoIslandSet          (the token holds no island set yet: store one, docs/kubernetes.md)
    ├── LogError                 -- a log step refused (log.py); nothing changed or released
    │   ├── NotAuthentic         (an entry or statement without the boundary's MAC)
    │   ├── StaleHead            (older than, or a fork of, what this hsm-proxy captured)
    │   ├── NotNextEntry         (capture: not the next link of this hsm-proxy's chain)
    │   ├── ProofRefused         (a record that is not what the head's root says)
    │   ├── NoQuorum             (release: too few hsm-proxies captured the entry)
    │   └── Frozen               (a member-set change: this hsm-proxy takes no part until it adopts the next)
    └── HsmError                 -- the token misbehaved: try again
        ├── HsmKeyMissing        (fleet-init was not run)
        ├── HsmLoginFailed       (wrong PIN: never tried again, a real HSM locks it)
        ├── HsmTokenUnavailable  (any other failure while opening -- no token, a
        │                         general error, "PIN not initialized": SoftHSM2
        │                         processes opening one token at once; open_token
        │                         tries again for a few seconds)
        └── HsmAuthTagMismatch   (AES-GCM tag check failed: raised by unseal,
                                  turned into one of the rejections above)
"""

from bkv_protocol.wire import ErrorCode as C
from bkv_server.rpc import ErrorTable


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


class PasswordProofRequired(HsmProxyError):
    """A live escrow changes only through its password: replacing or deleting
    it needs the change ticket of a recovery (bkv_protocol.transcripts). The
    device recovers first, then sends the change with the ticket."""


class TicketRejected(HsmProxyError):
    """The change ticket does not open for this user and island, has expired,
    is for an older version of the escrow (used, or the escrow changed since),
    or the device's proof over the request does not verify. Nothing changed:
    recover again for a new ticket."""


class IslandSetRefused(BadRequest):
    """The island set was not stored (not the admin's signature, not the
    next epoch, not a step of a migration); the message says why."""


class WrongIsland(HsmProxyError):
    """The island asked is not the only place the token's newest island set
    (``bkv_protocol.islands``) puts the user's record: its home, or, while a
    migration moves records, its home under both the new and the previous
    islands. So the boundary cannot tell that the user has no record, and
    signs no refusal and makes no new record here. Routed by a wrong map
    (etcd may lie), or mid-migration: ask again once the map is right."""


class NoIslandSet(WrongIsland):
    """The token holds no island set yet (a fleet made before island sets):
    the boundary signs no refusal and makes no new record anywhere until the
    admin's signed set is stored (``bkv-hsm-proxy store-island-set``)."""


class AuthenticationFailed(HsmProxyError):
    """The credential finalization did not verify: wrong password, or a
    forged message. Deliberately says nothing more."""


class RecordIntegrityFailure(HsmProxyError):
    pass


class RecordDestroyed(HsmProxyError):
    pass


class TooEarly(HsmProxyError):
    """A recover start before the record's not-before time (wrong guesses
    are spaced out, by the HSM's clock): nothing was spent or committed.
    ``signature`` is the fleet's over the record's state and the time
    (``bkv_protocol.transcripts.state_answer``), ``signed_state`` what it covers."""

    def __init__(self, message: str, signature: bytes, signed_state) -> None:
        super().__init__(message)
        self.signature = signature
        self.signed_state = signed_state


class LogError(HsmProxyError):
    """A log step was refused; nothing was changed or released."""


class NotAuthentic(LogError):
    """A log entry or capture statement does not carry the boundary's MAC."""


class StaleHead(LogError):
    """The head is older than (or forks from) what this hsm-proxy captured:
    the island read an old or rolled-back log. Read the newest head and retry;
    if etcd has none as new, etcd was rolled back (docs/reliability.md)."""


class NotNextEntry(LogError):
    """Capture refused: the entries do not extend this hsm-proxy's head link
    by link (a fork, a gap, or a replay). The caller must catch the
    hsm-proxy up from its head, or abandon this branch."""


class ProofRefused(LogError):
    """A record and its proof do not match the head's root: the record was
    changed, swapped or rolled back outside the protocol."""


class NoQuorum(LogError):
    """Release refused: fewer than a majority of the fleet's hsm-proxies
    captured this entry. Nothing leaves; capture it on more hsm-proxies."""


class Frozen(LogError):
    """This hsm-proxy froze for a change of the member set (docs/protocol.md,
    "Changing the member set"): it applies and captures nothing until it
    adopts the next set. The island tries the others; the change ends it."""


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


TABLE = ErrorTable(
    (MalformedOpaqueMessage, C.MALFORMED_OPAQUE_MESSAGE, False),
    (IslandSetRefused, C.INVALID_REQUEST, False),
    (BadRequest, C.INVALID_REQUEST, False),
    (ChallengeRejected, C.CHALLENGE_REJECTED, False),
    (LoginStateRejected, C.LOGIN_STATE_REJECTED, False),
    (PasswordProofRequired, C.PASSWORD_PROOF_REQUIRED, False),
    (TicketRejected, C.TICKET_REJECTED, False),
    (AuthenticationFailed, C.AUTHENTICATION_FAILED, False),
    (RecordDestroyed, C.RECORD_DESTROYED, False),
    (TooEarly, C.TOO_EARLY, False),
    (WrongIsland, C.WRONG_ISLAND, True),
    (RecordIntegrityFailure, C.RECORD_INTEGRITY_FAILURE, False),
    (NotAuthentic, C.LOG_NOT_AUTHENTIC, False),
    (StaleHead, C.STALE_HEAD, False),
    (NotNextEntry, C.NOT_NEXT_ENTRY, False),
    (ProofRefused, C.PROOF_REFUSED, False),
    (NoQuorum, C.NO_QUORUM, False),  # not yet: the island captures on more hsm-proxies first
    (Frozen, C.UNAVAILABLE, True),
    (LogError, C.INVALID_REQUEST, False),
    (HsmError, C.UNAVAILABLE, True),
)
