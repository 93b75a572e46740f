"""Account tokens: EdDSA (Ed25519) JWTs from the app's identity service.

The frontend only verifies; ``bkv_dev.issuer.DevIssuer`` mints tokens for the
local dev fleet (it signs for anyone, so it never runs in production). A token names
the user (``sub``); an optional ``cnf.bkv_device_key`` binds it to a device's
Noise static key (see docs/edge.md).
"""

from __future__ import annotations

import hmac
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bkv_frontend.errors import Unauthenticated
from bkv_protocol.ids import USER_ID_RE

MAX_DEVICE_KEY_CHARS = 256  # a Noise static key in base64 is 44
LEEWAY_S = 30
VERIFIED_CACHE = 50_000


DEVICE_HEADER = "x-bkv-device-key"  # set by the Noise edge only (docs/edge.md)


def check_device(claims: dict, device_header: str | None, *, required: bool) -> None:
    """A token bound to a device (``cnf.bkv_device_key``) is only good over a
    Noise session with that device's key; a stolen token alone is useless."""
    cnf = claims.get("cnf")
    bound = cnf.get("bkv_device_key") if isinstance(cnf, dict) else None  # both checked by TokenVerifier
    if bound is None:
        if required:
            raise Unauthenticated()
        return
    # Bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
    if device_header is None or not hmac.compare_digest(str(bound).encode(), device_header.encode("latin-1")):
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
        except (TypeError, ValueError, OverflowError, RecursionError):
            # PyJWT (2.15) turns these into DecodeError itself; whatever another version does,
            # a claim it converts (int(), json) must not escape as a 500.
            raise Unauthenticated() from None
        check_claim_types(claims)
        return claims


MAX_TIME = 2**63 - 1  # seconds; any real exp/iat/nbf is far below


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TIME


def check_claim_types(claims: object) -> None:
    """Every claim this service reads has the type it is read as; anything
    else is a 401, never a 500 later. PyJWT checks exp/iat/nbf with int(),
    which takes "123" and 1.5, and never looks at cnf."""
    if not isinstance(claims, dict):
        raise Unauthenticated()
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USER_ID_RE.fullmatch(sub):
        raise Unauthenticated()
    if not _is_int(claims.get("exp")) or not _is_int(claims.get("iat")):
        raise Unauthenticated()
    if "nbf" in claims and not _is_int(claims["nbf"]):
        raise Unauthenticated()
    if "cnf" in claims:
        cnf = claims["cnf"]
        if not isinstance(cnf, dict):
            raise Unauthenticated()
        key = cnf.get("bkv_device_key")
        if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_DEVICE_KEY_CHARS):
            raise Unauthenticated()
