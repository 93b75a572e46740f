"""Noise_IK_25519_ChaChaPoly_SHA256 sessions, shared by the edge (responder)
and the client transport (initiator).

After the two-message IK handshake, each side holds the two transport keys.
Every request carries an explicit 64-bit counter; requests on one session
may arrive out of order (concurrent HTTP requests), so the responder keeps a
replay window instead of Noise's implicit nonce: a counter is accepted once,
and only if it is above the lowest counter still in the window. The
response to request ``n`` is sealed with counter ``n`` under the other key,
so no (key, nonce) pair is ever used twice.

    request body  = u64 counter | ChaCha20-Poly1305(k_c2s, nonce(counter), inner, aad = session_id)
    inner         = u16 len | path | u16 len | authorization | body
    response body = ChaCha20-Poly1305(k_s2c, nonce(counter), u16 status | body, aad = session_id)
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from noise.connection import Keypair, NoiseConnection

from bkv_common.secrets import Secret
from bkv_edge.errors import BadMessage, HandshakeFailed

PROTOCOL = b"Noise_IK_25519_ChaChaPoly_SHA256"
PROLOGUE = b"bkv/v1/noise"
WINDOW = 4096
SESSION_ID_LEN = 16


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
    return b"".join(struct.pack(">H", len(f)) + f for f in fields[:-1]) + fields[-1]


@dataclass
class Session:
    session_id: bytes
    k_recv: bytes
    k_send: bytes
    peer_static: bytes
    created: float = field(default_factory=time.monotonic)
    _seen: set = field(default_factory=set)
    _high: int = -1

    def __repr__(self) -> str:
        return f"Session(id={self.session_id.hex()[:8]}..., keys=(redacted))"

    # -- responder side ---------------------------------------------------------------
    def open_request(self, body: bytes) -> tuple[int, str, str, bytes]:
        """(counter, path, authorization, inner body); raises BadMessage."""
        if len(body) < 8 + 16:
            raise BadMessage("message too short")
        (counter,) = struct.unpack(">Q", body[:8])
        if counter in self._seen or counter <= self._high - WINDOW:
            raise BadMessage("replayed or too old")
        try:
            inner = ChaCha20Poly1305(self.k_recv).decrypt(_nonce(counter), body[8:], self.session_id)
        except InvalidTag:
            raise BadMessage("ciphertext failed authentication") from None
        self._seen.add(counter)
        if counter > self._high:
            self._high = counter
            self._seen = {c for c in self._seen if c > self._high - WINDOW}
        try:
            (plen,) = struct.unpack_from(">H", inner, 0)
            path = inner[2:2 + plen].decode()
            (alen,) = struct.unpack_from(">H", inner, 2 + plen)
            auth = inner[4 + plen:4 + plen + alen].decode()
            payload = inner[4 + plen + alen:]
        except (struct.error, UnicodeDecodeError):
            raise BadMessage("malformed inner request") from None
        if not path.startswith("/v1/"):
            raise BadMessage("only the v1 API is reachable through Noise")
        return counter, path, auth, payload

    def seal_response(self, counter: int, status: int, body: bytes) -> bytes:
        return ChaCha20Poly1305(self.k_send).encrypt(_nonce(counter), struct.pack(">H", status) + body,
                                                     self.session_id)

    # -- initiator side ------------------------------------------------------------------
    def seal_request(self, counter: int, path: str, authorization: str, body: bytes) -> bytes:
        inner = _pack(path.encode(), authorization.encode(), body)
        return struct.pack(">Q", counter) + ChaCha20Poly1305(self.k_send).encrypt(
            _nonce(counter), inner, self.session_id)

    def open_response(self, counter: int, body: bytes) -> tuple[int, bytes]:
        try:
            plain = ChaCha20Poly1305(self.k_recv).decrypt(_nonce(counter), body, self.session_id)
        except InvalidTag:
            raise BadMessage("the edge's answer failed authentication") from None
        return struct.unpack(">H", plain[:2])[0], plain[2:]


def _connection(static: StaticKey) -> NoiseConnection:
    conn = NoiseConnection.from_name(PROTOCOL)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static.reveal())
    conn.set_prologue(PROLOGUE)
    return conn


def respond(edge_key: StaticKey, message1: bytes) -> tuple[Session, bytes]:
    """Responder: read IK message 1, answer with message 2."""
    conn = _connection(edge_key)
    conn.set_as_responder()
    conn.start_handshake()
    try:
        payload = conn.read_message(message1)
        peer = conn.noise_protocol.handshake_state.rs.public_bytes
        message2 = bytes(conn.write_message(b""))
    except Exception:  # noqa: BLE001 - any failure is the same answer: not for this key, or garbage
        raise HandshakeFailed("the handshake does not verify for this edge key") from None
    if payload:
        raise HandshakeFailed("no application data is accepted in the handshake")
    session = Session(os.urandom(SESSION_ID_LEN), conn.noise_protocol.cipher_state_decrypt.k,
                      conn.noise_protocol.cipher_state_encrypt.k, peer)
    return session, message2


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
        return Session(session_id, p.cipher_state_decrypt.k, p.cipher_state_encrypt.k, b"")
