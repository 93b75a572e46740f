"""Secret byte strings whose repr and str never show their value."""

from __future__ import annotations

import hmac


class Secret:
    """Holds secret bytes; ``repr``/``str`` print ``(redacted)``.

    Use ``.reveal()`` at the one place the raw bytes are needed.
    """

    __slots__ = ("_value",)
    kind = "Secret"

    def __init__(self, value: bytes) -> None:
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"{self.kind} takes bytes")
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:  # secrets are not dict keys
        raise TypeError(f"{self.kind} is unhashable")

    def __repr__(self) -> str:
        return f"{self.kind}(redacted)"

    __str__ = __repr__

    def __reduce__(self):  # no pickling secrets into caches or logs by accident
        raise TypeError(f"{self.kind} cannot be pickled")


class BackupKey(Secret):
    """K: the 32-byte key that encrypts a backup."""

    kind = "BackupKey"

    def __init__(self, value: bytes) -> None:
        if len(value) != 32:
            raise ValueError("a backup key is 32 bytes")
        super().__init__(value)


class Password(Secret):
    kind = "Password"


class OpaqueState(Secret):
    """A client or server OPAQUE state: never logged, never stored in clear."""

    kind = "OpaqueState"


class TicketKey(Secret):
    """The key of a change ticket (bkv_protocol.transcripts.ticket_key): proof
    of the password for one change of the escrow. Never sent."""

    kind = "TicketKey"
