"""Length-prefixed canonical encoding and base64 helpers for the wire."""

from __future__ import annotations

import base64
import hashlib
import struct

from bkv_protocol import labels


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    """Strict standard base64 (padding required, no whitespace)."""
    return base64.b64decode(text.encode("ascii"), validate=True)


def canonical(label: bytes, *fields: bytes) -> bytes:
    """``label || (u32be len || field)*`` -- unambiguous, so no two different
    field lists share an encoding."""
    parts = [struct.pack(">I", len(label)), label]
    for f in fields:
        parts.append(struct.pack(">I", len(f)))
        parts.append(f)
    return b"".join(parts)


def digest(label: bytes, *fields: bytes) -> bytes:
    return hashlib.sha256(canonical(label, *fields)).digest()


def request_digest(message: bytes) -> bytes:
    return digest(labels.REQUEST_HASH, message)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def user_ref(user_id: str) -> str:
    """A user's name in storage and placement: a hash, so etcd holds no user
    ids, and admin tools can move records knowing only their keys."""
    return digest(labels.USER_KEY_HASH, user_id.encode()).hex()


def fleet_id_for(public_key_der: bytes) -> str:
    """A fleet's id: a short hash of its signing public key (clients derive it
    from the key they pin, never take it from the server)."""
    return digest(labels.FLEET_ID_HASH, public_key_der)[:16].hex()
