"""Exceptions of the client SDK: each one is an outcome the caller can act on.

::

    VaultError
    ├── WrongPassword      the password is wrong; ``attempts_left`` tries remain (signed by the fleet)
    ├── LockedOut          no attempts left: the record is destroyed; the backup cannot be decrypted
    ├── NoRecord           nothing is registered for this account
    ├── TooEarly           wrong guesses are spaced out: no recovery before ``retry_at`` (signed by
    │                      the fleet); nothing was spent
    ├── EscrowExists       a live escrow is replaced only with its password (recover first), or
    │                      after its attempts are spent (``VaultClient.spend_remaining_attempts``)
    ├── Unauthorized       the account token was refused; sign in again
    ├── VaultUnavailable   the vault did not answer before the deadline; try later
    │   └── UnsignedAnswer no_record / record_destroyed / too_early without a valid fleet signature
    │                      for this account: not acted on (someone on the path, or a tier, may have forged it)
    ├── RateLimited        over a rate limit (account, device or address) for longer than the
    │                      deadline: nothing was done; ``retry_after`` seconds until it is taken
    ├── BadSignature       a vault answer failed the fleet signature check; nothing was acted on
    ├── UntrustedFleet     no validation bundle verified against the pinned roots; nothing was sent
    │   └── StaleBundle    the newest bundle this device has is too old (a newer one may be withheld)
    └── ProtocolError      the vault refused a step (``code`` says which); start the operation again
"""

from __future__ import annotations


class VaultError(Exception):
    pass


class WrongPassword(VaultError):
    """Tries were decremented: ``attempts_left`` remain before the record is destroyed."""

    def __init__(self, attempts_left: int) -> None:
        self.attempts_left = attempts_left
        if attempts_left:
            msg = f"wrong password; {attempts_left} attempt{'s' if attempts_left != 1 else ''} left"
        else:
            msg = "wrong password; that was the last attempt and the key is now destroyed"
        super().__init__(msg)


class LockedOut(VaultError):
    """The record is gone for good. Nothing more can be recovered with any password."""


class NoRecord(VaultError):
    """No key is escrowed for this account. Register first."""


class TooEarly(VaultError):
    """Wrong guesses are spaced out in time: the vault's HSM refuses another
    recovery of this escrow before ``retry_at`` (a UTC ``datetime``, by the
    HSM's clock; signed by the fleet). Nothing was spent. Try again then; a
    right password clears the wait."""

    def __init__(self, retry_at) -> None:
        self.retry_at = retry_at
        super().__init__(f"too many wrong passwords lately: try again after {retry_at:%Y-%m-%d %H:%M:%S} UTC "
                         "(no attempt was spent)")


class EscrowExists(VaultError):
    """A key is escrowed for this account already, and the vault changes a
    live escrow only with proof of its password: recover it first and pass
    the recovery's ticket (``change_password``, ``replace_key``), or, with
    the password forgotten, spend its remaining attempts first (each one
    signed), after which the old key is gone for good."""


class Unauthorized(VaultError):
    """The account token is missing, expired or for another device."""


class VaultUnavailable(VaultError):
    """Retried until the deadline without an answer. Safe to try again later."""


class UnsignedAnswer(VaultUnavailable):
    """An answer that would change what the device does (no record,
    destroyed, too early) came without a fleet signature this device
    verifies: over this request, or over this account's record state. It was
    not acted on and nothing changed on the device: treat it like no answer."""


class RateLimited(VaultError):
    """The vault answered 429 ``rate_limited`` (too many requests for this
    account, device or address) and the wait it named ends past the SDK's
    deadline. Nothing was done; ``retry_after`` seconds from now it is
    taken. Shorter waits the SDK waits out itself, then sends again."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"the vault is refusing requests for this account or device for now (rate limited); "
                         f"nothing was done; try again in {retry_after:.0f}s")


class BadSignature(VaultError):
    """A vault answer was not signed by the pinned fleet key: a man in the
    middle, a tampered answer, or a stale pinned key. Nothing was acted on."""


class UntrustedFleet(VaultError):
    """The vault's validation bundle did not verify against the pinned
    operator and witness roots (or lists no fleet valid now), and no earlier
    good bundle is cached. Nothing was sent to any fleet."""


class StaleBundle(UntrustedFleet):
    """The newest validation bundle this device holds is past its expiry or
    older than the configured maximum age, and no newer one could be fetched:
    a newer one (new fleet keys after a rotation) may be withheld. Nothing was
    sent. Check the network and the device clock, then try again; if it goes
    on, tell the vault's operator."""


class ProtocolError(VaultError):
    """The vault refused a step; ``code`` is the stable error code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")
