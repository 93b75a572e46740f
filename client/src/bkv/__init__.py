"""Backup Key Vault client: the SDK (:mod:`bkv.sdk`) and the ``bkv`` CLI."""

from bkv.errors import (  # noqa: F401
    BadSignature,
    LockedOut,
    NoRecord,
    ProtocolError,
    TooEarly,
    Unauthorized,
    VaultError,
    VaultUnavailable,
    WrongPassword,
)
