"""The async client SDK: escrow a 32-byte backup key K under a password.

The client runs the client side of OPAQUE (names follow the RFC's phases),
checks the fleet signature on every answer before acting on it, and keeps K
and the password on the device. See docs/protocol.md for every byte.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import httpx
import opaque_ke_py as opaque
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ValidationError

from bkv import errors
from bkv_common import labels
from bkv_common.encoding import canonical, fleet_id_for, request_digest, u32, u64
from bkv_common.retry import Backoff, DeadlineExceeded, retry
from bkv_common.secrets import BackupKey, Password
from bkv_common.wire import ErrorBody
from bkv_frontend import api


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(secret)


@dataclass(frozen=True)
class Registration:
    version: int
    max_attempts: int


@dataclass(frozen=True)
class Recovery:
    key: BackupKey
    # "reset": attempts are back to the maximum. "destroyed": the last attempt
    # was used; K is back but the record is gone, so register again.
    record_status: str


class _Retry(Exception):
    pass


class VaultClient:
    """One account on one fleet. ``fleet_public_key`` is the pinned DER key."""

    def __init__(self, base_url: str, fleet_public_key: bytes, user_id: str, token: str, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 backoff: Backoff = Backoff(deadline_s=15.0, first_delay_s=0.05, max_delay_s=1.0),
                 timeout_s: float = 10.0) -> None:
        key = serialization.load_der_public_key(fleet_public_key)
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise ValueError("the pinned fleet key must be an ECDSA P-256 public key")
        self._fleet_key = key
        self.fleet_id = fleet_id_for(fleet_public_key)
        self.user_id = user_id
        self._uid = user_id.encode()
        self._backoff = backoff
        self._http = httpx.AsyncClient(base_url=base_url, transport=transport, timeout=timeout_s,
                                       headers={"authorization": f"Bearer {token}"})

    def __repr__(self) -> str:
        return f"VaultClient(user_id={self.user_id!r}, fleet_id={self.fleet_id}, token=(redacted))"

    async def __aenter__(self) -> VaultClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- transport -------------------------------------------------------------------
    async def _call(self, method: str, path: str, body: BaseModel | None, out: type[BaseModel] | None, *,
                    idempotent: bool):
        async def attempt(_: int):
            try:
                resp = await self._http.request(
                    method, path, content=None if body is None else body.model_dump_json(),
                    headers={"content-type": "application/json"} if body is not None else None)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                raise _Retry(str(exc)) from exc
            except httpx.TransportError as exc:
                if idempotent:
                    raise _Retry(str(exc)) from exc
                raise errors.VaultUnavailable(f"the connection failed mid-request: {exc}") from exc
            if resp.status_code == 503:
                raise _Retry("the vault is unavailable")
            if resp.status_code >= 400:
                raise self._error(resp)
            if out is None:
                return None
            try:
                return out.model_validate_json(resp.content)
            except ValidationError as exc:
                raise errors.ProtocolError("malformed_response", "the vault sent an answer that does not parse") from exc

        try:
            return await retry(attempt, retry_on=lambda e: isinstance(e, _Retry), backoff=self._backoff)
        except DeadlineExceeded as exc:
            raise errors.VaultUnavailable(
                f"the vault did not answer within {self._backoff.deadline_s:.0f}s ({exc.__cause__}); "
                "nothing was changed on this device; try again later") from exc

    @staticmethod
    def _error(resp: httpx.Response) -> errors.VaultError:
        try:
            err = ErrorBody.model_validate_json(resp.content).error
            code, message = err.code.value, err.message
        except ValidationError:
            code, message = "http_error", f"HTTP {resp.status_code}"
        if code == "unauthenticated":
            return errors.Unauthorized("the account token was refused; sign in again")
        if code == "no_record":
            return errors.NoRecord("no key is escrowed for this account")
        if code == "record_destroyed":
            return errors.LockedOut("the escrowed key was destroyed after too many wrong passwords (or disabled); "
                                    "backups made with it can no longer be decrypted")
        return errors.ProtocolError(code, message)

    def _verify(self, signature: bytes, label: bytes, *fields: bytes) -> None:
        try:
            self._fleet_key.verify(signature, canonical(label, self.fleet_id.encode(), *fields),
                                   ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise errors.BadSignature("a vault answer failed the fleet signature check; nothing was acted on") from None

    # -- public API ------------------------------------------------------------------
    async def fleet(self) -> api.FleetInfo:
        return await self._call("GET", "/v1/fleet", None, api.FleetInfo, idempotent=True)

    async def register(self, key: BackupKey, password: Password | str) -> Registration:
        """Escrow ``key`` under ``password``. Replaces any earlier registration."""
        pw = _pw(password)
        started = opaque.client_registration_start(pw)
        req = started.get_message()
        out: api.RegistrationStartOut = await self._call(
            "POST", "/v1/registration/start", api.RegistrationStartRequest(registration_request=req),
            api.RegistrationStartOut, idempotent=True)
        self._verify(out.signature, labels.SIG_REGISTRATION_START, self._uid, request_digest(req),
                     out.registration_response, out.challenge)
        try:
            finished = await asyncio.to_thread(opaque.client_registration_finish, pw, started.get_state(),
                                               out.registration_response)
        except ValueError:
            raise errors.ProtocolError("malformed_opaque_message", "the registration response does not parse") from None
        opaque_k = _hkdf(finished.get_export_key(), labels.OPAQUE_K_INFO)
        k_nonce = os.urandom(12)
        ek = AESGCM(opaque_k).encrypt(k_nonce, key.reveal(), canonical(labels.EK_AAD, self._uid))
        upload = finished.get_message()
        done: api.RegistrationFinishOut = await self._call(
            "POST", "/v1/registration/finish",
            api.RegistrationFinishRequest(challenge=out.challenge, registration_upload=upload, ek=ek, k_nonce=k_nonce),
            api.RegistrationFinishOut, idempotent=False)
        self._verify(done.signature, labels.SIG_REGISTRATION_FINISH, self._uid, request_digest(upload),
                     u64(done.version), u32(done.max_attempts))
        return Registration(version=done.version, max_attempts=done.max_attempts)

    async def recover(self, password: Password | str) -> Recovery:
        """Get K back. Raises :class:`~bkv.errors.WrongPassword` with the
        attempts left, or :class:`~bkv.errors.LockedOut`."""
        pw = _pw(password)
        started = opaque.client_login_start(pw)
        req = started.get_message()
        out: api.RecoveryStartOut = await self._call(
            "POST", "/v1/recovery/start", api.RecoveryStartRequest(credential_request=req),
            api.RecoveryStartOut, idempotent=False)
        self._verify(out.signature, labels.SIG_LOGIN_START, self._uid, request_digest(req),
                     out.credential_response, u32(out.attempts_left))
        try:
            finished = await asyncio.to_thread(opaque.client_login_finish, pw, started.get_state(),
                                               out.credential_response)
        except ValueError:
            # The one wrong-password outcome; the count is the fleet's signed word.
            raise errors.WrongPassword(out.attempts_left) from None
        fin = finished.get_message()
        done: api.RecoveryFinishOut = await self._call(
            "POST", "/v1/recovery/finish",
            api.RecoveryFinishRequest(login_state=out.login_state, credential_finalization=fin),
            api.RecoveryFinishOut, idempotent=False)
        self._verify(done.signature, labels.SIG_LOGIN_FINISH, self._uid, request_digest(fin), done.wrapped_key,
                     done.rk_nonce, done.record_status.value.encode())
        try:
            inner = AESGCM(_hkdf(finished.get_session_key(), labels.RECOVERY_WRAP_INFO)).decrypt(
                done.rk_nonce, done.wrapped_key, canonical(labels.RECOVERY_WRAP_AAD, self._uid))
            ek, k_nonce = inner[:-12], inner[-12:]
            k = AESGCM(_hkdf(finished.get_export_key(), labels.OPAQUE_K_INFO)).decrypt(
                k_nonce, ek, canonical(labels.EK_AAD, self._uid))
        except (InvalidTag, ValueError):
            raise errors.ProtocolError("unwrap_failed", "the recovered key did not authenticate") from None
        return Recovery(key=BackupKey(k), record_status=done.record_status.value)

    async def delete(self) -> bool:
        """Destroy this account's escrowed key. True if there was one."""
        out: api.DeleteOut = await self._call("DELETE", "/v1/record", None, api.DeleteOut, idempotent=True)
        return out.deleted


def _pw(password: Password | str) -> bytes:
    if isinstance(password, Password):
        return password.reveal()
    if isinstance(password, str):
        if not password:
            raise ValueError("the password is empty")
        return password.encode("utf-8")
    raise TypeError("password must be a Password or str")
