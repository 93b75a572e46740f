"""The client SDK: escrow a 32-byte backup key K under a password.

The client runs the client side of OPAQUE (names follow the RFC's phases),
checks the fleet signature on every answer before acting on it, and keeps K
and the password on the device. See docs/protocol.md for every byte.

The protocol is written once, without I/O: each operation is a generator
that yields :class:`Call` (an HTTP exchange) or :class:`Work` (CPU-heavy
client work such as Argon2) and receives the result. :class:`VaultClient`
(asyncio) and :class:`VaultClientSync` (blocking; used under Locust) drive
the same generators.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Generator

import httpx
import opaque_ke_py as opaque
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ValidationError

from bkv import errors
from bkv_protocol import labels, transcripts
from bkv_protocol import operations as ops
from bkv_protocol.encoding import canonical, fleet_id_for
from bkv_protocol.retry import Backoff, DeadlineExceeded, retry, retry_sync
from bkv_protocol.secrets import BackupKey, Password, TicketKey
from bkv_protocol.wire import ErrorBody, ErrorCode, SignedState
from bkv.transport import NoiseError, tls_context
from bkv_protocol import v1 as api

DEFAULT_BACKOFF = Backoff(deadline_s=15.0, first_delay_s=0.05, max_delay_s=1.0)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(secret)


@dataclass(frozen=True)
class Registration:
    version: int
    max_attempts: int


@dataclass(frozen=True)
class ChangeTicket:
    """Proof of the password for one change of the escrow (a replacing
    registration or a deletion) at the version a recovery left it, for a few
    minutes: the vault's sealed ``ticket`` and the key only this device and
    the HSM derived from that recovery's OPAQUE session."""

    ticket: bytes
    key: TicketKey

    def proof(self, request: bytes) -> bytes:
        return transcripts.ticket_proof(self.key.reveal(), request)

    def __repr__(self) -> str:
        return "ChangeTicket(redacted)"


@dataclass(frozen=True)
class Recovery:
    key: BackupKey
    # "reset": attempts are back to the maximum. "destroyed": the last attempt
    # was used; K is back but the record is gone, so register again.
    record_status: str
    # With "reset": what replaces or deletes the escrow (register(..., ticket=),
    # delete(ticket)). None: destroyed, nothing left to change.
    ticket: ChangeTicket | None = None


@dataclass(frozen=True)
class Deletion:
    """The escrow is deleted (a tombstone at ``version``), signed by the fleet
    over this device's request: safe to act on (delete the backups)."""

    version: int


@dataclass(frozen=True)
class EventFeed:
    """The account's events, verified: the fleet signed the record's current
    ``version`` and event chain ``head`` for this read, and ``events`` (oldest
    first, consecutive versions) chain to that head. ``missing``: versions
    the chain proves had events that were not shown -- older than the vault
    keeps, or hidden by a tier (after ``after_version`` when one was given:
    what this device has not seen yet). Empty: every change since is here."""

    events: tuple[api.Event, ...]
    version: int
    head: bytes
    missing: range

    @property
    def complete(self) -> bool:
        return len(self.missing) == 0


def verify_feed(out: api.EventsOut, after_version: int = 0) -> EventFeed:
    """The chain of ``out``'s events from ``before`` to the signed ``head``
    (its signature is checked by the caller): BadSignature if an event was
    dropped, altered, reordered or added, or the last is not the signed version."""
    h, previous = out.before, None
    for ev in out.events:
        if previous is not None and ev.version != previous + 1:
            raise errors.BadSignature(f"the event feed skips from version {previous} to {ev.version}: an event "
                                      "was hidden or altered on the way")
        h, previous = transcripts.event_chain(h, transcripts.event_bytes(
            ev.version, ev.kind.value, ev.attempts_left, ev.at_ms)), ev.version
    if h != out.head or (previous is not None and previous != out.version):
        raise errors.BadSignature("the events shown do not chain to the fleet-signed head: an event was hidden or "
                                  "altered on the way")
    first = out.events[0].version if out.events else out.version + 1
    # A chain that starts from nothing has nothing before it; else every version before the first shown had one.
    start = first if out.before == transcripts.EVENTS_EMPTY else max(after_version + 1, 1)
    return EventFeed(tuple(out.events), out.version, out.head, range(min(start, first), first))


@dataclass(frozen=True)
class Call:
    """One HTTP exchange. Every call may be sent again after any failure
    (a reset connection, a 5xx, a new Noise session): the ones that change
    state carry a request id and ``request`` (their fingerprint,
    ``bkv_protocol.transcripts``), and the vault answers a resend of them from
    what it committed, so a resend never spends an attempt."""

    method: str
    path: str
    body: BaseModel | None
    out: type[BaseModel] | None
    request: bytes | None = None  # fingerprint the signed refusals (no_record, record_destroyed) must cover
    # The operation's routes on a vault built before the catalogue (bkv_protocol.operations),
    # tried when the vault has no such route: this client works with it until it is upgraded.
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Work:
    fn: Callable[..., Any]
    args: tuple


Steps = Generator["Call | Work", Any, Any]


class _Retry(Exception):
    pass


class _Wait(_Retry):
    """A 429: send again no sooner than ``retry_after_s`` (bkv_protocol.retry
    honours it), or give up with errors.RateLimited if that is past the deadline."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _pw(password: Password | str) -> bytes:
    if isinstance(password, Password):
        return password.reveal()
    if isinstance(password, str):
        if not password:
            raise ValueError("the password is empty")
        return password.encode("utf-8")
    raise TypeError("password must be a Password or str")


class VaultProtocol:
    """The client side of the protocol for one account on one fleet.
    ``fleet_public_key`` is the pinned DER key."""

    def __init__(self, fleet_public_key: bytes, user_id: str) -> None:
        key = serialization.load_der_public_key(fleet_public_key)
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise ValueError("the pinned fleet key must be an ECDSA P-256 public key")
        self._fleet_key = key
        self.fleet_id = fleet_id_for(fleet_public_key)
        self.user_id = user_id
        self._uid = user_id.encode()

    def verify(self, signature: bytes, transcript: bytes) -> None:
        """``transcript``: one of ``bkv_protocol.transcripts``'s, for our fleet."""
        try:
            self._fleet_key.verify(signature, transcript, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise errors.BadSignature("a vault answer failed the fleet signature check; nothing was acted on") from None

    def refusal_is_signed(self, call: Call, code: transcripts.Refusal, signature: bytes | None,
                          state: SignedState | None = None) -> bool:
        """A ``no_record`` / ``record_destroyed`` / ``too_early`` counts only
        when the fleet signed it: over this account's record state
        (``state``: island, version, and for ``too_early`` the time;
        ``transcripts.state_answer``, the form the hsm-proxy signs), or, from
        a fleet built before, over this very request. One for another account
        or request does not verify; why a replay of a state's is harmless:
        docs/protocol.md, "Refusals"."""
        if signature is None:
            return False
        if state is not None:
            if (state.retry_at is not None) != (code is transcripts.Refusal.TOO_EARLY):
                return False
            transcript = transcripts.state_answer(self.fleet_id, self.user_id, state.island, state.version, code,
                                                  state.retry_at or 0)
        elif call.request is None or code is transcripts.Refusal.TOO_EARLY:
            return False
        else:
            transcript = transcripts.refusal_answer(self.fleet_id, call.request, code)
        try:
            self.verify(signature, transcript)
        except errors.BadSignature:
            return False
        return True

    # -- operations (sans I/O) -------------------------------------------------------
    def register(self, key: BackupKey, password: Password | str, ticket: ChangeTicket | None = None) -> Steps:
        """Escrow ``key``. Over a live escrow only with ``ticket`` (a recovery's:
        proof of the current password), else :class:`~bkv.errors.EscrowExists`."""
        pw = _pw(password)
        started = opaque.client_registration_start(pw)
        req = started.get_message()
        out: api.RegistrationStartOut = yield Call(
            "POST", ops.REGISTRATION_START.path,
            api.RegistrationStartRequest(fleet_id=self.fleet_id, registration_request=req), api.RegistrationStartOut)
        self.verify(out.signature, transcripts.registration_start_answer(
            self.fleet_id, self.user_id, req, out.registration_response, out.challenge))
        try:
            finished = yield Work(opaque.client_registration_finish, (pw, started.get_state(), out.registration_response))
        except ValueError:
            raise errors.ProtocolError("malformed_opaque_message", "the registration response does not parse") from None
        opaque_k = _hkdf(finished.get_export_key(), labels.OPAQUE_K_INFO)
        k_nonce = os.urandom(12)
        ek = AESGCM(opaque_k).encrypt(k_nonce, key.reveal(), canonical(labels.EK_AAD, self._uid))
        upload = finished.get_message()
        rid = os.urandom(transcripts.REQUEST_ID_LEN)
        request = transcripts.registration_finish_request(self.fleet_id, self.user_id, rid, out.challenge, upload,
                                                          ek, k_nonce, None if ticket is None else ticket.ticket)
        proof = {} if ticket is None else {"ticket": ticket.ticket, "ticket_proof": ticket.proof(request)}
        done: api.RegistrationFinishOut = yield Call(
            "POST", ops.REGISTRATION_FINISH.path,
            api.RegistrationFinishRequest(fleet_id=self.fleet_id, request_id=rid, challenge=out.challenge,
                                          registration_upload=upload, ek=ek, k_nonce=k_nonce, **proof),
            api.RegistrationFinishOut, request)
        # Covers ek and k_nonce: a tier that swapped them gets no valid "registered".
        self.verify(done.signature, transcripts.registration_finish_answer(
            self.fleet_id, request, done.version, done.max_attempts))
        return Registration(version=done.version, max_attempts=done.max_attempts)

    def recover(self, password: Password | str) -> Steps:
        pw = _pw(password)
        started = opaque.client_login_start(pw)
        out = yield from self.recover_start(started.get_message())
        try:
            finished = yield Work(opaque.client_login_finish, (pw, started.get_state(), out.credential_response))
        except ValueError:
            # The one wrong-password outcome; the count is the fleet's signed word.
            raise errors.WrongPassword(out.attempts_left) from None
        fin = finished.get_message()
        rid = os.urandom(transcripts.REQUEST_ID_LEN)
        request = transcripts.recover_finish_request(self.fleet_id, self.user_id, rid, out.login_state, fin)
        done: api.RecoverFinishOut = yield Call(
            "POST", ops.RECOVER_FINISH.path,
            api.RecoverFinishRequest(fleet_id=self.fleet_id, request_id=rid, login_state=out.login_state,
                                      credential_finalization=fin),
            api.RecoverFinishOut, request, ops.RECOVER_FINISH.aliases)
        self.verify(done.signature, transcripts.recover_finish_answer(
            self.fleet_id, request, done.wrapped_key, done.rk_nonce, done.record_status.value))
        try:
            inner = AESGCM(_hkdf(finished.get_session_key(), labels.RECOVERY_WRAP_INFO)).decrypt(
                done.rk_nonce, done.wrapped_key, canonical(labels.RECOVERY_WRAP_AAD, self._uid))
            ek, k_nonce = inner[:-12], inner[-12:]
            k = AESGCM(_hkdf(finished.get_export_key(), labels.OPAQUE_K_INFO)).decrypt(
                k_nonce, ek, canonical(labels.EK_AAD, self._uid))
        except (InvalidTag, ValueError):
            raise errors.ProtocolError("unwrap_failed", "the recovered key did not authenticate") from None
        ticket = None
        if done.ticket is not None:
            ticket = ChangeTicket(done.ticket, TicketKey(transcripts.ticket_key(finished.get_session_key())))
        return Recovery(key=BackupKey(k), record_status=done.record_status.value, ticket=ticket)

    def change(self, password: Password | str, new_password: Password | str, new_key: BackupKey | None) -> Steps:
        """Recover with ``password``, then escrow ``new_key`` (None: the same
        K) under ``new_password`` with the recovery's ticket."""
        got: Recovery = yield from self.recover(password)
        # No ticket: that recovery used the last attempt and the escrow is
        # gone; registering afresh needs no proof.
        yield from self.register(new_key or got.key, new_password, got.ticket)
        return got.key if new_key is None else new_key

    def recover_start(self, credential_request: bytes) -> Steps:
        """Only the first, cheap step of a recovery (the guess-flood load path)."""
        rid = os.urandom(transcripts.REQUEST_ID_LEN)
        request = transcripts.recover_start_request(self.fleet_id, self.user_id, rid, credential_request)
        out: api.RecoverStartOut = yield Call(
            "POST", ops.RECOVER_START.path,
            api.RecoverStartRequest(fleet_id=self.fleet_id, request_id=rid, credential_request=credential_request),
            api.RecoverStartOut, request, ops.RECOVER_START.aliases)
        self.verify(out.signature, transcripts.recover_start_answer(
            self.fleet_id, request, out.credential_response, out.attempts_left))
        return out

    def delete(self, ticket: ChangeTicket) -> Steps:
        """Delete the escrow with a recovery's ticket; the answer is signed
        over this request, or the signed refusal says it was gone already."""
        rid = os.urandom(transcripts.REQUEST_ID_LEN)
        request = transcripts.delete_request(self.fleet_id, self.user_id, rid, ticket.ticket)
        out: api.DeleteOut = yield Call(
            "DELETE", "/v1/record",
            api.DeleteRequest(fleet_id=self.fleet_id, request_id=rid, ticket=ticket.ticket,
                              ticket_proof=ticket.proof(request)), api.DeleteOut, request)
        self.verify(out.signature, transcripts.delete_answer(self.fleet_id, request, out.version))
        return Deletion(version=out.version)

    def spend_remaining_attempts(self) -> Steps:
        """The honest way out for a forgotten password, at the thief's cost:
        spend every attempt left, each one a signed login start with a
        random password, until the fleet signs that the escrow is destroyed.
        Returns how many were spent; then :meth:`register` may escrow anew."""
        spent = 0
        while True:
            started = opaque.client_login_start(os.urandom(32))
            try:
                out = yield from self.recover_start(started.get_message())
            except (errors.LockedOut, errors.NoRecord):  # signed for this request: nothing (left) to spend
                return spent
            spent += 1
            if out.attempts_left == 0:
                return spent

    def events(self, after_version: int = 0) -> Steps:
        """The account's event feed, verified (:func:`verify_feed`): signed for
        this read's fresh nonce, so an old feed cannot stand in for a newer one."""
        nonce = os.urandom(16)
        out: api.EventsOut = yield Call("POST", ops.EVENTS.path, api.EventsRequest(fleet_id=self.fleet_id, nonce=nonce),
                                        api.EventsOut)
        self.verify(out.signature, transcripts.events_answer(self.fleet_id, self.user_id, out.version, out.head, nonce))
        return verify_feed(out, after_version)

    def fleet(self) -> Steps:
        return (yield Call("GET", "/v1/fleet", None, api.FleetInfo))


# -- answers to outcomes (shared by both drivers) ----------------------------------------
_REFUSALS = {ErrorCode.NO_RECORD: transcripts.Refusal.NO_RECORD,
             ErrorCode.RECORD_DESTROYED: transcripts.Refusal.RECORD_DESTROYED,
             ErrorCode.TOO_EARLY: transcripts.Refusal.TOO_EARLY}
# Sealed answers that say "not now": the same request is sent again (it is safe: see Call).
_RESEND = {502, 503, 504}
# The outcomes a caller acts on, as the SDK's exceptions (bkv.errors says what to do on each);
# any other code: ProtocolError(code), start the operation again.
_OUTCOMES: dict[ErrorCode, Callable[[], errors.VaultError]] = {
    ErrorCode.NO_RECORD: lambda: errors.NoRecord("no key is escrowed for this account"),
    ErrorCode.RECORD_DESTROYED: lambda: errors.LockedOut(
        "the escrowed key was destroyed after too many wrong passwords (or disabled); "
        "backups made with it can no longer be decrypted"),
    ErrorCode.UNAUTHENTICATED: lambda: errors.Unauthorized("the account token was refused; sign in again"),
    ErrorCode.PASSWORD_PROOF_REQUIRED: lambda: errors.EscrowExists(
        "a key is escrowed for this account already; it is replaced only with its "
        "password, or after its remaining attempts are spent"),
}


def _error(protocol: VaultProtocol, call: Call, resp: httpx.Response) -> errors.VaultError:
    try:
        err = ErrorBody.model_validate_json(resp.content).error
        code, message, signature = err.code, err.message, err.signature
    except ValidationError:
        return errors.ProtocolError("http_error", f"HTTP {resp.status_code}")
    if code in _REFUSALS and not protocol.refusal_is_signed(call, _REFUSALS[code], signature, err.state):
        # Only a fleet signature over this account's record state (or this request)
        # makes these true; anyone on the path or in a tier could have written this one.
        return errors.UnsignedAnswer(f"the vault said {code.value!r} without the fleet's signature for this "
                                     "account; not acted on, nothing was changed on this device; try again later")
    if code is ErrorCode.TOO_EARLY:  # verified above: the HSM's signed not-before time
        return errors.TooEarly(datetime.datetime.fromtimestamp(err.state.retry_at / 1000, datetime.timezone.utc))
    outcome = _OUTCOMES.get(code)
    return outcome() if outcome is not None else errors.ProtocolError(code.value, message)


def _no_such_route(resp: httpx.Response) -> bool:
    return resp.status_code == 404 and _code(resp) is ErrorCode.NOT_FOUND


def _code(resp: httpx.Response) -> ErrorCode | None:
    try:
        return ErrorBody.model_validate_json(resp.content).error.code
    except ValidationError:
        return None


def _request_args(call: Call) -> dict:
    if call.body is None:
        return {}
    return {"content": call.body.model_dump_json(), "headers": {"content-type": "application/json"}}


def _decode(protocol: VaultProtocol, call: Call, resp: httpx.Response):
    if resp.status_code in _RESEND:
        raise _Retry(f"the vault answered {resp.status_code}")
    if resp.status_code == 429:
        raise _Wait("the vault answered 429 (rate limited)", _wait(resp))
    if resp.status_code == 409 and b"wrong_island" in resp.content and _code(resp) is ErrorCode.WRONG_ISLAND:
        # The vault's signed island set does not place this account where it was
        # looked for (a stale or forged routing map, records moving): nothing was
        # decided, so the same request is sent again; at the deadline, VaultUnavailable.
        raise _Retry("the vault looked for this account on another island than its signed island set says")
    if resp.status_code >= 400:
        raise _error(protocol, call, resp)
    if call.out is None:
        return None
    try:
        return call.out.model_validate_json(resp.content)
    except ValidationError as exc:
        raise errors.ProtocolError("malformed_response", "the vault sent an answer that does not parse") from exc


def _wait(resp: httpx.Response) -> float:
    """The seconds a 429 names: the body's ``retry_after`` (the only place a
    sealed answer can carry it), else the Retry-After header, else 1."""
    try:
        wait = ErrorBody.model_validate_json(resp.content).error.retry_after
    except ValidationError:
        wait = None
    if wait is None:
        try:
            wait = float(resp.headers.get("retry-after", "1"))
        except ValueError:
            wait = 1.0
    return max(0.0, float(wait))


def _edge_failure(exc: Exception) -> errors.VaultError:
    return errors.BadSignature(f"the vault's Noise edge could not be authenticated ({exc}); "
                               "nothing was sent; check the pinned edge key")


def _transport_failure(exc: Exception) -> Exception:
    """Any failure on the way (a reset, a timeout, a clear answer outside the
    Noise seal -- the edge's refusal or a forgery): send the same request
    again; a resend is answered from the commit, never evaluated twice."""
    wait = getattr(exc, "retry_after_s", None)  # the edge's per-source 429 (transport.EdgeRefused)
    return _Wait(str(exc), wait) if wait is not None else _Retry(str(exc) or type(exc).__name__)


def _resume(steps: Steps, value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Feed the last result (or error) to the protocol: (True, its return
    value) when it finished, else (False, the next step)."""
    try:
        return False, (steps.throw(error) if error is not None else steps.send(value))
    except StopIteration as done:
        return True, done.value


def _unavailable(backoff: Backoff, exc: DeadlineExceeded) -> errors.VaultError:
    if isinstance(exc.__cause__, _Wait):
        return errors.RateLimited(exc.__cause__.retry_after_s)
    return errors.VaultUnavailable(
        f"the vault did not answer within {backoff.deadline_s:.0f}s ({exc.__cause__}); "
        "nothing was changed on this device; try again later")


class VaultClient:
    """asyncio driver. Use as ``async with VaultClient(...) as vault``."""

    def __init__(self, base_url: str, fleet_public_key: bytes, user_id: str, token: str, *,
                 transport: httpx.AsyncBaseTransport | None = None, backoff: Backoff = DEFAULT_BACKOFF,
                 timeout_s: float = 10.0) -> None:
        self.protocol = VaultProtocol(fleet_public_key, user_id)
        self.user_id = user_id
        self.fleet_id = self.protocol.fleet_id
        self._backoff = backoff
        self._http = httpx.AsyncClient(base_url=base_url, transport=transport, timeout=timeout_s,
                                       headers={"authorization": f"Bearer {token}"}, verify=tls_context())

    def __repr__(self) -> str:
        return f"VaultClient(user_id={self.user_id!r}, fleet_id={self.fleet_id}, token=(redacted))"

    async def __aenter__(self) -> VaultClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call):
        async def attempt(_: int):
            try:
                for path in (call.path, *call.aliases):
                    resp = await self._http.request(call.method, path, **_request_args(call))
                    if not _no_such_route(resp):
                        break
            except httpx.TransportError as exc:
                raise _transport_failure(exc) from exc
            except NoiseError as exc:
                raise _edge_failure(exc) from exc
            return _decode(self.protocol, call, resp)

        try:
            return await retry(attempt, retry_on=lambda e: isinstance(e, _Retry), backoff=self._backoff)
        except DeadlineExceeded as exc:
            raise _unavailable(self._backoff, exc) from exc

    async def _drive(self, steps: Steps):
        value: Any = None
        error: BaseException | None = None
        while True:
            finished, step = _resume(steps, value, error)
            if finished:
                return step
            value, error = None, None
            try:
                if isinstance(step, Call):
                    value = await self._send(step)
                else:
                    value = await asyncio.to_thread(step.fn, *step.args)
            except ValueError as exc:  # an OPAQUE step refused its input: the protocol decides
                error = exc

    async def fleet(self) -> api.FleetInfo:
        return await self._drive(self.protocol.fleet())

    async def register(self, key: BackupKey, password: Password | str,
                       ticket: ChangeTicket | None = None) -> Registration:
        """Escrow ``key`` under ``password``. Where a live escrow exists it is
        replaced only with ``ticket`` (from :meth:`recover`): else
        :class:`~bkv.errors.EscrowExists`."""
        return await self._drive(self.protocol.register(key, password, ticket))

    async def change_password(self, password: Password | str, new_password: Password | str) -> BackupKey:
        """Re-escrow the same K under ``new_password``; proves ``password``
        first (one recovery). Returns K."""
        return await self._drive(self.protocol.change(password, new_password, None))

    async def replace_key(self, password: Password | str, new_key: BackupKey,
                          new_password: Password | str | None = None) -> BackupKey:
        """Escrow ``new_key`` in place of the current K, proving ``password``
        first; backups made with the old K need the old K from then on."""
        return await self._drive(self.protocol.change(password, new_password or password, new_key))

    async def spend_remaining_attempts(self) -> int:
        """Forgotten password: spend every attempt left (each one signed) so
        the escrow is destroyed and :meth:`register` may start afresh."""
        return await self._drive(self.protocol.spend_remaining_attempts())

    async def recover(self, password: Password | str) -> Recovery:
        """Get K back. Raises :class:`~bkv.errors.WrongPassword` with the
        attempts left, or :class:`~bkv.errors.LockedOut`."""
        return await self._drive(self.protocol.recover(password))

    async def recover_start(self, credential_request: bytes) -> api.RecoverStartOut:
        return await self._drive(self.protocol.recover_start(credential_request))

    async def delete(self, ticket: ChangeTicket) -> Deletion:
        """Destroy this account's escrowed key, with a recovery's ``ticket``
        (proof of the password). Raises :class:`~bkv.errors.LockedOut` or
        :class:`~bkv.errors.NoRecord` (signed) if it was gone already."""
        return await self._drive(self.protocol.delete(ticket))

    async def events(self, after_version: int = 0) -> EventFeed:
        """This account's events (registered, attempts used, recovered, ...),
        signed by the fleet and checked: :class:`~bkv.errors.BadSignature` if
        a tier hid or altered one; ``EventFeed.missing`` names versions not
        shown (after ``after_version``, the last one this device saw)."""
        return await self._drive(self.protocol.events(after_version))

    async def disable(self, password: Password | str) -> Deletion:
        """Recover with ``password``, then delete the escrow with that ticket."""
        got = await self.recover(password)
        if got.ticket is None:
            raise errors.LockedOut("the recovery used the last attempt: the escrow is already gone")
        return await self.delete(got.ticket)


class VaultClientSync:
    """Blocking driver of the same protocol (Locust users, scripts)."""

    def __init__(self, base_url: str, fleet_public_key: bytes, user_id: str, token: str, *,
                 transport: httpx.BaseTransport | None = None, backoff: Backoff = DEFAULT_BACKOFF,
                 timeout_s: float = 10.0) -> None:
        self.protocol = VaultProtocol(fleet_public_key, user_id)
        self.user_id = user_id
        self._backoff = backoff
        self._http = httpx.Client(base_url=base_url, transport=transport, timeout=timeout_s,
                                  headers={"authorization": f"Bearer {token}"}, verify=tls_context())

    def __repr__(self) -> str:
        return f"VaultClientSync(user_id={self.user_id!r}, token=(redacted))"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VaultClientSync:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, call: Call):
        def attempt(_: int):
            try:
                for path in (call.path, *call.aliases):
                    resp = self._http.request(call.method, path, **_request_args(call))
                    if not _no_such_route(resp):
                        break
            except httpx.TransportError as exc:
                raise _transport_failure(exc) from exc
            except NoiseError as exc:
                raise _edge_failure(exc) from exc
            return _decode(self.protocol, call, resp)

        try:
            return retry_sync(attempt, retry_on=lambda e: isinstance(e, _Retry), backoff=self._backoff)
        except DeadlineExceeded as exc:
            raise _unavailable(self._backoff, exc) from exc

    def _drive(self, steps: Steps):
        value: Any = None
        error: BaseException | None = None
        while True:
            finished, step = _resume(steps, value, error)
            if finished:
                return step
            value, error = None, None
            try:
                value = self._send(step) if isinstance(step, Call) else step.fn(*step.args)
            except ValueError as exc:
                error = exc

    def register(self, key: BackupKey, password: Password | str,
                 ticket: ChangeTicket | None = None) -> Registration:
        return self._drive(self.protocol.register(key, password, ticket))

    def recover(self, password: Password | str) -> Recovery:
        return self._drive(self.protocol.recover(password))

    def recover_start(self, credential_request: bytes) -> api.RecoverStartOut:
        return self._drive(self.protocol.recover_start(credential_request))

    def delete(self, ticket: ChangeTicket) -> Deletion:
        return self._drive(self.protocol.delete(ticket))

    def events(self, after_version: int = 0) -> EventFeed:
        return self._drive(self.protocol.events(after_version))
