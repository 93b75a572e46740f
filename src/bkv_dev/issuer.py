"""The dev fleet's identity service: mints account tokens the frontend
verifies (``bkv_frontend.auth``). It signs for anyone, so it belongs to the
local fleet and the chart's test hooks only, never to production."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bkv_protocol.ids import USER_ID_RE


class DevIssuer:
    """The dev fleet's identity service: an Ed25519 key in the state dir."""

    def __init__(self, private_key: Ed25519PrivateKey, issuer: str = "bkv-dev-issuer", audience: str = "bkv") -> None:
        self._key = private_key
        self.issuer = issuer
        self.audience = audience

    def __repr__(self) -> str:
        return "DevIssuer(key=(redacted))"

    @classmethod
    def load_or_create(cls, directory: Path) -> DevIssuer:
        directory.mkdir(parents=True, exist_ok=True)
        priv_path = directory / "issuer-key.pem"
        if priv_path.exists():
            key = cls.load(directory)._key
        else:
            key = Ed25519PrivateKey.generate()
            priv_path.touch(mode=0o600)
            priv_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
        (directory / "issuer-public.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return cls(key)

    @classmethod
    def load(cls, directory: Path) -> DevIssuer:
        """The existing key only, writing nothing (a read-only Secret mount)."""
        key = serialization.load_pem_private_key((directory / "issuer-key.pem").read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the issuer key is not an Ed25519 private key")
        return cls(key)

    def mint(self, user_id: str, *, ttl_s: int = 30 * 24 * 3600, device_key_b64: str | None = None) -> str:
        if not USER_ID_RE.fullmatch(user_id):
            raise ValueError("user ids are 1-128 characters of letters, digits and . _ @ + -")
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.audience, "sub": user_id, "iat": now, "exp": now + ttl_s}
        if device_key_b64:
            claims["cnf"] = {"bkv_device_key": device_key_b64}
        return jwt.encode(claims, self._key, algorithm="EdDSA")
