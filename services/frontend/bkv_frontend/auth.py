"""Account tokens: EdDSA (Ed25519) JWTs from the app's identity service.

The frontend only verifies; :class:`DevIssuer` mints tokens for the local dev
fleet (it signs for anyone, so it never runs in production). A token names
the user (``sub``); an optional ``cnf.bkv_device_key`` binds it to a device's
Noise static key (see docs/edge.md).
"""

from __future__ import annotations

import hmac
import re
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

USER_ID = re.compile(r"^[A-Za-z0-9._@+\-]{1,128}$")
LEEWAY_S = 30
VERIFIED_CACHE = 50_000


DEVICE_HEADER = "x-bkv-device-key"  # set by the Noise edge only (docs/edge.md)


class Unauthenticated(Exception):
    """Missing, malformed, expired or foreign token. The message is uniform."""


def check_device(claims: dict, device_header: str | None, *, required: bool) -> None:
    """A token bound to a device (``cnf.bkv_device_key``) is only good over a
    Noise session with that device's key; a stolen token alone is useless."""
    bound = (claims.get("cnf") or {}).get("bkv_device_key")
    if bound is None:
        if required:
            raise Unauthenticated()
        return
    if device_header is None or not hmac.compare_digest(str(bound), device_header):
        raise Unauthenticated()


class TokenVerifier:
    def __init__(self, public_key: Ed25519PublicKey, issuer: str, audience: str) -> None:
        self._key = public_key
        self._issuer = issuer
        self._audience = audience
        self._verified: dict[str, dict] = {}

    @classmethod
    def from_pem_file(cls, path: Path, issuer: str, audience: str) -> TokenVerifier:
        key = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the token public key must be Ed25519")
        return cls(key, issuer, audience)

    def verify(self, authorization: str | None) -> dict:
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthenticated()
        hit = self._verified.get(authorization)
        if hit is not None and hit["exp"] + LEEWAY_S > time.time():
            return hit
        claims = self._verify(authorization)
        # A verified token stays valid until it expires; remembering it saves an
        # Ed25519 verification per request. Bounded, oldest dropped first.
        self._verified[authorization] = claims
        if len(self._verified) > VERIFIED_CACHE:
            self._verified.pop(next(iter(self._verified)))
        return claims

    def _verify(self, authorization: str) -> dict:
        try:
            claims = jwt.decode(
                authorization[7:], self._key, algorithms=["EdDSA"], audience=self._audience,
                issuer=self._issuer, leeway=LEEWAY_S, options={"require": ["sub", "exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError:
            raise Unauthenticated() from None
        if not isinstance(claims.get("sub"), str) or not USER_ID.match(claims["sub"]):
            raise Unauthenticated()
        return claims


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
        if not USER_ID.match(user_id):
            raise ValueError("user ids are 1-128 characters of letters, digits and . _ @ + -")
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.audience, "sub": user_id, "iat": now, "exp": now + ttl_s}
        if device_key_b64:
            claims["cnf"] = {"bkv_device_key": device_key_b64}
        return jwt.encode(claims, self._key, algorithm="EdDSA")
