"""Noise_IK_25519_ChaChaPoly_SHA256, the device's (initiator's) side, used by
the client transport (bkv/transport.py). The responder is the edge's Noise
processor, in Go: services/edge/noise-processor/noise.go.

After the two-message IK handshake, each side holds the two transport keys.
Every request carries an explicit 64-bit counter; requests on one session
may arrive out of order (concurrent HTTP requests), so the edge keeps a
replay window instead of Noise's implicit nonce. The response to request
``n`` is sealed with counter ``n`` under the other key, so no (key, nonce)
pair is ever used twice.

    request body  = u64 counter | ChaCha20-Poly1305(k_c2s, nonce(counter), inner, aad = session_id)
    inner         = u16 len | path | u16 len | authorization | body
    response body = ChaCha20-Poly1305(k_s2c, nonce(counter), padded, aad = session_id)
    padded        = u16 status | u32 len | body | zero bytes up to padded_size(6 + len)

Answers are padded inside the seal to a few sizes (2 KiB, 8 KiB, 32 KiB,
then multiples of 32 KiB), so that the outer length does not tell one
outcome of a route from another (docs/edge.md).

Exceptions::


    EdgeError
    ├── HandshakeFailed     the edge did not prove the pinned key
    └── BadMessage          the edge's answer failed authentication or is not padded as agreed

The edge's own refusals are JSON answers with these codes (the processor's
tree: services/edge/noise-processor/errors.go; docs/edge.md):
``400 noise_handshake_failed``, ``401 noise_session_unknown`` (handshake
again), ``400 noise_bad_message`` (the session is closed) and ``404 not_found``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from noise.connection import Keypair, NoiseConnection

from bkv_protocol.encoding import pack16
from bkv_protocol.secrets import Secret

class EdgeError(Exception):
    code = "noise_error"


class HandshakeFailed(EdgeError):
    code = "noise_handshake_failed"


class BadMessage(EdgeError):
    code = "noise_bad_message"


PROTOCOL = b"Noise_IK_25519_ChaChaPoly_SHA256"
PROLOGUE = b"bkv/v1/noise"
SESSION_ID_LEN = 16
ANSWER_HEADER_LEN = 6  # u16 status | u32 body length
PADDING_RUNGS = (2 << 10, 8 << 10, 32 << 10)  # the processor's (noise.go: paddingRungs)


def padded_size(n: int) -> int:
    """The sealed plaintext's length for ``n`` bytes of status, length and body."""
    for rung in PADDING_RUNGS:
        if n <= rung:
            return rung
    return -(-n // PADDING_RUNGS[-1]) * PADDING_RUNGS[-1]


class StaticKey(Secret):
    """An X25519 static private key (the edge's or a device's)."""

    kind = "StaticKey"

    @classmethod
    def generate(cls) -> StaticKey:
        return cls(X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()))

    @property
    def public(self) -> bytes:
        return X25519PrivateKey.from_private_bytes(self.reveal()).public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _nonce(counter: int) -> bytes:
    return b"\x00" * 4 + struct.pack("<Q", counter)  # Noise's ChaChaPoly nonce layout


def _pack(*fields: bytes) -> bytes:
    """Every field framed but the last, which runs to the end (the body)."""
    return pack16(*fields[:-1]) + fields[-1]


@dataclass
class Session:
    """A device's transport session: seals its requests, opens the edge's answers."""

    session_id: bytes
    k_recv: bytes
    k_send: bytes

    def __repr__(self) -> str:
        return f"Session(id={self.session_id.hex()[:8]}..., keys=(redacted))"

    def seal_request(self, counter: int, path: str, authorization: str, body: bytes) -> bytes:
        inner = _pack(path.encode(), authorization.encode(), body)
        return struct.pack(">Q", counter) + ChaCha20Poly1305(self.k_send).encrypt(
            _nonce(counter), inner, self.session_id)

    def open_response(self, counter: int, body: bytes) -> tuple[int, bytes]:
        try:
            plain = ChaCha20Poly1305(self.k_recv).decrypt(_nonce(counter), body, self.session_id)
        except InvalidTag:
            raise BadMessage("the edge's answer failed authentication") from None
        if len(plain) < ANSWER_HEADER_LEN:
            raise BadMessage("the edge's answer has no status")
        status, length = struct.unpack(">HI", plain[:ANSWER_HEADER_LEN])
        end = ANSWER_HEADER_LEN + length
        # The padding is checked too: an answer that is not padded as agreed
        # (a wrong length, a wrong size, anything but zeros) is not opened.
        if end > len(plain) or len(plain) != padded_size(end) or plain[end:] != bytes(len(plain) - end):
            raise BadMessage("the edge's answer is not padded as agreed")
        return status, plain[ANSWER_HEADER_LEN:end]


def _connection(static: StaticKey) -> NoiseConnection:
    conn = NoiseConnection.from_name(PROTOCOL)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static.reveal())
    conn.set_prologue(PROLOGUE)
    return conn


class Initiator:
    """Client side of the handshake, pinned to ``edge_public``."""

    def __init__(self, device_key: StaticKey, edge_public: bytes) -> None:
        self._conn = _connection(device_key)
        self._conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, edge_public)
        self._conn.set_as_initiator()
        self._conn.start_handshake()

    def first_message(self) -> bytes:
        return bytes(self._conn.write_message(b""))  # empty payload: nothing is sent before the edge proves its key

    def finish(self, session_id: bytes, message2: bytes) -> Session:
        try:
            self._conn.read_message(message2)
        except Exception:  # noqa: BLE001
            raise HandshakeFailed("the edge did not prove the pinned key") from None
        p = self._conn.noise_protocol
        return Session(session_id, p.cipher_state_decrypt.k, p.cipher_state_encrypt.k)
