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


def pack16(*fields: bytes) -> bytes:
    """``(u16be len || field)*``: the compact framing of what is sealed (a
    record, a login state: ``bkv_hsm_proxy``) and of a Noise request's
    path and token (``bkv_protocol.noise``). Never hashed or signed: those
    use :func:`canonical`."""
    for f in fields:
        if len(f) > 0xFFFF:
            raise ValueError("a field over 65535 bytes")
    return b"".join(struct.pack(">H", len(f)) + f for f in fields)


def unpack16(data: bytes, count: int) -> list[bytes]:
    """The ``count`` fields :func:`pack16` made; ValueError if ``data`` is
    anything else (truncated, or with trailing bytes)."""
    out, i = [], 0
    for _ in range(count):
        if i + 2 > len(data):
            raise ValueError("truncated")
        (n,) = struct.unpack_from(">H", data, i)
        i += 2
        if i + n > len(data):
            raise ValueError("truncated")
        out.append(data[i : i + n])
        i += n
    if i != len(data):
        raise ValueError("trailing bytes")
    return out


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
