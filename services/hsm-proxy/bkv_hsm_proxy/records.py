"""The record operations: what registering, recovering and deleting do to one
user's record, as functions of the request and the opened record (after
Juicebox's ``hsm_core`` ``app.rs``, apart from its ``commit.rs``).

Nothing here reads etcd, checks the log or opens a record: the boundary
(:class:`bkv_hsm_proxy.core.VaultHsm`) proves the record against the log,
opens it, hands it in, seals what comes back as the next entry and holds
the answer until a quorum captured it. What the operations need of the
token -- sealing a challenge, a login state or a ticket, and signing an
answer -- is injected (:class:`Sealer`, ``bkv_hsm_proxy.keys.Keys``), as are
the clock, the randomness and the island set.

What a reviewer checks here:

* The guess limit. :func:`recover_start` is the only step that evaluates the
  password under a live record's OPRF key, and it returns the record with
  one attempt fewer -- ``None``, a tombstone, at zero -- together with the
  CredentialResponse: no answer without the decrement. A malformed request
  fails before (no attempt spent on it). :func:`recover_finish` with the right
  password resets the attempts; with a wrong one it fails with the one
  ``AuthenticationFailed``, whatever was wrong.
* Every registration has a credential identifier of its own (a fresh salt,
  :func:`credential_id`): :func:`registration_start` never evaluates under
  a live record's key, so it is no guess.
* A live escrow changes only through its password: replaced or deleted with
  the change ticket a successful :func:`recover_finish` issued
  (:func:`check_ticket`), or destroyed by spending its attempts.
* Wrong guesses are spaced out in time by the HSM's own clock: every
  :func:`recover_start` that spends an attempt seals into the record a
  not-before time for the next one (``Context.guess_delays_s``, by attempts
  spent since the last right password); one before it is refused with a
  signed ``too_early`` (:class:`StateAnswers`) and spends nothing. A right
  password clears it with the count.
* Every answer is a typed ``bkv_protocol.v1`` answer, signed over the whole
  request (its fingerprint, kept with the answer for resends); a refusal
  without an OPAQUE message (``no_record``, ``record_destroyed``,
  ``too_early``) is signed over the record's state instead, once per state
  (:class:`StateAnswers`).
* Every change makes the account's event (:func:`event`: the version after
  it, what it did, the attempts left, the HSM clock's time), which the
  boundary chains into the entry (``core.VaultHsm._next``).
"""

from __future__ import annotations

import dataclasses
import hmac
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

import opaque_ke_py as opaque
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bkv_hsm_proxy import errors
from bkv_protocol import hsm_api as api
from bkv_protocol import labels, transcripts, v1
from bkv_protocol.wire import SignedState
from bkv_protocol.encoding import canonical, pack16, u32, u64, unpack16, user_ref
from bkv_server import metrics

CHALLENGE_TTL_MS = 120_000
LOGIN_STATE_TTL_MS = 60_000
TICKET_TTL_MS = 300_000  # a recovery, then the new password typed and its registration sent
EK_LEN = api.EK_LEN  # AES-256-GCM of a 32-byte K
K_NONCE_LEN = api.K_NONCE_LEN
SALT_LEN = 16
# 1: the build before salted credential identifiers (no salt); 2: salted; 3: with the not-before time.
# Every format is still read (1 and 2 as "no delay"); a record is written in the oldest format that
# holds it (Record.pack), so records that never waited stay readable by the build before.
RECORD_FORMAT = 3
# Seconds a record waits for its next recover start after the n-th attempt spent since the last right
# password (n = 1, 2, ...; past the end, the last one again), after iOS's passcode delays: four
# guesses free, then minutes, then hours -- ten wrong guesses take about a day (23 h 21 min).
# Per fleet: BKV_HSM_GUESS_DELAYS_S (settings.py), the chart's guessDelaysSeconds.
DEFAULT_GUESS_DELAYS_S = (0, 0, 0, 60, 300, 900, 3600, 6 * 3600, 16 * 3600)
MAX_GUESS_DELAY_S = 7 * 24 * 3600
STATE_ANSWERS_KEPT = 50_000  # signed per-state answers kept in memory (StateAnswers)


class Clock(Protocol):
    def now_ms(self) -> int: ...


class Rng(Protocol):
    def token_bytes(self, n: int) -> bytes: ...


# -- compact binary encodings of the sealed plaintexts ---------------------------
# Sealed plaintexts are framed by bkv_protocol.encoding.pack16 (compact, never hashed or signed).


def credential_id(uid: bytes, salt: bytes | None) -> bytes:
    """OPAQUE's credential identifier of a registration: the user and the
    registration's own salt, so that its OPRF key is no other
    registration's. None: a record of the build before salts (the bare user
    id, which no registration start uses any more)."""
    return uid if salt is None else canonical(labels.CREDENTIAL_ID, uid, salt)


@dataclass(frozen=True)
class Record:
    """A registration as the HSM sees it. Exists in clear only in here."""

    password_file: bytes
    ek: bytes
    k_nonce: bytes
    attempts_left: int
    max_attempts: int
    salt: bytes | None = None  # of the credential identifier (credential_id); None: format 1's bare user id
    not_before_ms: int = 0     # no recover start before this (the HSM's clock, ms); formats 1 and 2: 0

    def __repr__(self) -> str:
        return f"Record(redacted, attempts_left={self.attempts_left}, not_before_ms={self.not_before_ms})"

    def credential_id(self, uid: bytes) -> bytes:
        return credential_id(uid, self.salt)

    # The fields after the format byte, by format: each format appends to the one before.
    _FIELDS = {1: 5, 2: 6, 3: 7}

    def pack(self) -> bytes:
        """In the oldest format that holds it: 1 (no salt: re-sealed as it was
        written, its identifier must not change), 2, or 3 with a not-before
        time (where a format-1 record keeps its bare user id: an empty salt)."""
        fields = [self.password_file, self.ek, self.k_nonce, u32(self.attempts_left), u32(self.max_attempts)]
        if self.not_before_ms:
            return pack16(bytes([RECORD_FORMAT]), *fields, self.salt or b"", u64(self.not_before_ms))
        if self.salt is None:
            return pack16(b"\x01", *fields)
        return pack16(b"\x02", *fields, self.salt)

    @classmethod
    def unpack(cls, data: bytes) -> Record:
        fmt = data[2] if len(data) > 2 else 0
        if fmt not in cls._FIELDS:
            raise ValueError("unknown record format")
        _, pf, ek, kn, left, mx, *more = unpack16(data, 1 + cls._FIELDS[fmt])
        salt = more[0] if more else None            # format 2 on: the salt (format 3: empty = none)
        not_before = struct.unpack(">Q", more[1])[0] if len(more) > 1 else 0  # format 3 on
        if fmt == 3 and not salt:
            salt = None
        if salt is not None and len(salt) != SALT_LEN:
            raise ValueError("unknown record format")
        return cls(pf, ek, kn, struct.unpack(">I", left)[0], struct.unpack(">I", mx)[0], salt, not_before)


def guess_delay_ms(delays_s: tuple[int, ...], spent: int) -> int:
    """How long the next recover start waits after the ``spent``-th attempt
    spent since the last right password (``DEFAULT_GUESS_DELAYS_S``)."""
    if not delays_s or spent <= 0:
        return 0
    return 1000 * delays_s[min(spent, len(delays_s)) - 1]


def check_guess_delays(delays_s) -> tuple[int, ...]:
    """A schedule as configured: whole seconds, each between 0 and a week."""
    delays = tuple(int(d) for d in delays_s)
    if any(not 0 <= d <= MAX_GUESS_DELAY_S for d in delays) or len(delays) > 1000:
        raise ValueError(f"guess delays are at most 1000 values, each 0..{MAX_GUESS_DELAY_S} seconds")
    return delays


# -- what the operations are given -------------------------------------------------
class Sealer(Protocol):
    """The token, as far as the record operations use it (``keys.Keys``)."""

    def sign(self, fleet: str | None, transcript: Callable[[str], bytes]) -> bytes: ...
    def seal_transient(self, fleet: str | None, label: bytes, uid: bytes, island: str, data: bytes) -> bytes: ...
    def unseal_transient(self, fleet: str | None, label: bytes, uid: bytes, island: str, blob: bytes) -> bytes: ...


class StateAnswers:
    """Signed per-state answers (``transcripts.state_answer``: no record,
    destroyed, too early, for one user's record on one island at one
    version), each signed once and then served from here: a flood at a dead,
    absent or waiting account costs the token no new signature. Bounded
    (the oldest go first); a signature is no secret."""

    def __init__(self, size: int = STATE_ANSWERS_KEPT) -> None:
        self._size = size
        self._kept: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def answer(self, token: Sealer, fleet: str | None, user_id: str, island: str, version: int,
               code: transcripts.Refusal, retry_at_ms: int = 0) -> tuple[bytes, SignedState]:
        """(signature, what it covers besides user and code)."""
        key = (fleet, user_id, island, version, code, retry_at_ms)
        with self._lock:
            sig = self._kept.get(key)
            if sig is not None:
                self._kept.move_to_end(key)
        if sig is None:
            sig = token.sign(fleet, lambda f: transcripts.state_answer(f, user_id, island, version, code,
                                                                       retry_at_ms))
            metrics.child(metrics.STATE_ANSWERS, "signed").inc()
            with self._lock:
                self._kept[key] = sig
                while len(self._kept) > self._size:
                    self._kept.popitem(last=False)
        else:
            metrics.child(metrics.STATE_ANSWERS, "kept").inc()
        return sig, SignedState(island=island, version=version, retry_at=retry_at_ms or None)


@dataclass(frozen=True)
class Context:
    max_attempts: int
    setup: opaque.ServerSetupData  # the OPAQUE server setup: private
    token: Sealer
    clock: Clock
    rng: Rng
    # ``settled(user ref, island, what)``: raises WrongIsland unless the token's
    # island set places the user's record on ``island`` alone (a new record is made only there).
    settled: Callable[[str, str, str], None]
    guess_delays_s: tuple[int, ...] = ()  # DEFAULT_GUESS_DELAYS_S's shape; empty: no delay
    states: StateAnswers = field(default_factory=StateAnswers)

    def __repr__(self) -> str:  # the setup is private: never in a repr
        return f"records.Context(max_attempts={self.max_attempts}, opaque_setup=(redacted))"


@dataclass(frozen=True)
class Outcome:
    """What a state change makes: the record at the next version (None: a
    tombstone), the answer, kept for resends under the request's fingerprint,
    and the account's event for it."""

    record: Record | None
    answer: v1.RegistrationFinishOut | v1.RecoverStartOut | v1.RecoverFinishOut | v1.DeleteOut
    fingerprint: bytes
    event: v1.Event

    def __repr__(self) -> str:
        return f"Outcome(record={self.record!r}, answer={type(self.answer).__name__}(redacted))"


def event(version: int, kind: v1.EventKind, attempts_left: int, clock: Clock) -> v1.Event:
    """The account's event for the change that makes ``version``, at the HSM clock's time."""
    return v1.Event(version=version, kind=kind, attempts_left=attempts_left, at_ms=clock.now_ms())


def _opaque(step: str, fn, *args):
    t = time.perf_counter()
    try:
        return fn(*args)
    except ValueError:
        raise errors.MalformedOpaqueMessage(f"{step}: the OPAQUE message does not parse") from None
    finally:
        metrics.child(metrics.HSM_OP, f"opaque_{step}").observe(time.perf_counter() - t)


# -- registration ------------------------------------------------------------
def registration_start(req: api.RegistrationStartIn, ctx: Context) -> v1.RegistrationStartOut:
    """Evaluates the password under a fresh credential identifier (a new
    salt, sealed into the challenge): never under a live record's OPRF
    key, so it is no guess, and changes nothing."""
    uid = req.user_id.encode()
    if req.current.state is not api.EntryState.LIVE:  # a new record: only where the island set says
        ctx.settled(user_ref(req.user_id), req.island, "new record")
    salt = ctx.rng.token_bytes(SALT_LEN)
    response = _opaque("registration_start", opaque.server_registration_start,
                       ctx.setup, req.registration_request, credential_id(uid, salt)).get_message()
    expires = ctx.clock.now_ms() + CHALLENGE_TTL_MS
    challenge = ctx.token.seal_transient(req.fleet_id, labels.CHALLENGE_AAD, uid, req.island,
                                         pack16(u64(req.current.version), u64(expires), salt,
                                               ctx.rng.token_bytes(16)))
    sig = ctx.token.sign(req.fleet_id, lambda fleet: transcripts.registration_start_answer(
        fleet, req.user_id, req.registration_request, response, challenge))
    return v1.RegistrationStartOut(registration_response=response, challenge=challenge, signature=sig)


def registration_finish(req: api.RegistrationFinishIn, ctx: Context) -> Outcome:
    """A new record with every attempt, under the challenge's salt."""
    uid = req.user_id.encode()
    if len(req.ek) != EK_LEN or len(req.k_nonce) != K_NONCE_LEN:
        raise errors.BadRequest(f"ek must be {EK_LEN} bytes and k_nonce {K_NONCE_LEN} bytes")
    try:
        version_b, expires_b, salt, _ = unpack16(
            ctx.token.unseal_transient(req.fleet_id, labels.CHALLENGE_AAD, uid, req.island, req.challenge), 4)
    except (errors.HsmAuthTagMismatch, ValueError):
        raise errors.ChallengeRejected("the challenge was not issued for this user") from None
    _check_fresh(ctx, expires_b, version_b, req.current, errors.ChallengeRejected,
                 "the challenge has expired; start the registration again",
                 "the challenge was already used or superseded")
    fp = transcripts.registration_finish_request(req.fleet_id, req.user_id, req.request_id, req.challenge,
                                                 req.registration_upload, req.ek, req.k_nonce, req.ticket)
    # Where the log shows a live escrow, only its password replaces it;
    # absent or destroyed (attempts spent, or deleted), anyone may register.
    if req.current.state is api.EntryState.LIVE:
        check_ticket(ctx, req.fleet_id, uid, req.island, req.current, req.ticket, req.ticket_proof, fp)
    elif req.current.state is api.EntryState.MOVED:
        raise errors.BadRequest("the record moved to another island")
    else:  # a new record (absent, or over a tombstone): only on the island the signed set says
        ctx.settled(user_ref(req.user_id), req.island, "new record")
    password_file = _opaque("registration_finish", opaque.server_registration_finish,
                            req.registration_upload).get_password_file()
    record = Record(password_file, req.ek, req.k_nonce, ctx.max_attempts, ctx.max_attempts, salt)
    version = req.current.version + 1
    sig = ctx.token.sign(req.fleet_id, lambda fleet: transcripts.registration_finish_answer(
        fleet, fp, version, ctx.max_attempts))
    kind = v1.EventKind.PASSWORD_CHANGED if req.current.state is api.EntryState.LIVE else v1.EventKind.REGISTERED
    return Outcome(record, v1.RegistrationFinishOut(version=version, max_attempts=ctx.max_attempts, signature=sig),
                   fp, event(version, kind, ctx.max_attempts, ctx.clock))


# -- recover (OPAQUE's login phase) ---------------------------------------------
def recover_start(req: api.RecoverStartIn, record: Record, ctx: Context) -> Outcome:
    """One guess: the CredentialResponse, and the record with one attempt
    fewer and its next not-before time -- none left: no record (a
    tombstone). The two go together. Before the record's not-before time:
    TooEarly, signed, and nothing spent."""
    uid = req.user_id.encode()
    if record.attempts_left <= 0:  # only reachable for records written by an older build
        raise errors.RecordDestroyed("no attempts left")
    now = ctx.clock.now_ms()
    if now < record.not_before_ms:  # by the HSM's clock: no tier can skip it
        sig, state = ctx.states.answer(ctx.token, req.fleet_id, req.user_id, req.island, req.current.version,
                                       transcripts.Refusal.TOO_EARLY, record.not_before_ms)
        metrics.TOO_EARLY.inc()
        raise errors.TooEarly("too early for another guess at this record: nothing was spent", sig, state)
    # Parse and answer first: a malformed request must not cost an attempt.
    started = _opaque("recover_start", opaque.server_login_start,
                      ctx.setup, record.password_file, req.credential_request, record.credential_id(uid))
    left = record.attempts_left - 1
    version = req.current.version + 1
    wait = guess_delay_ms(ctx.guess_delays_s, record.max_attempts - left)
    after = None if left == 0 else dataclasses.replace(record, attempts_left=left,
                                                       not_before_ms=now + wait if wait else 0)
    expires = now + LOGIN_STATE_TTL_MS
    login_state = ctx.token.seal_transient(
        req.fleet_id, labels.LOGIN_STATE_AAD, uid, req.island,
        pack16(started.get_state(), u64(version), u64(expires), record.ek, record.k_nonce,
              ctx.rng.token_bytes(16)))
    response = started.get_message()
    fp = transcripts.recover_start_request(req.fleet_id, req.user_id, req.request_id, req.credential_request)
    sig = ctx.token.sign(req.fleet_id, lambda fleet: transcripts.recover_start_answer(fleet, fp, response, left))
    return Outcome(after, v1.RecoverStartOut(credential_response=response, login_state=login_state,
                                           attempts_left=left, signature=sig), fp,
                   event(version, v1.EventKind.DESTROYED if after is None else v1.EventKind.ATTEMPT_USED, left,
                         ctx.clock))


def recover_finish(req: api.RecoverFinishIn, record: Record | None, ctx: Context) -> Outcome:
    """The right password: K wrapped for the device, and the record (if it
    is still there: ``record``, opened from a live entry) with its attempts
    back to the maximum and a change ticket. A wrong one: AuthenticationFailed,
    nothing changes."""
    uid = req.user_id.encode()
    try:
        server_state, version_b, expires_b, ek, k_nonce, _ = unpack16(
            ctx.token.unseal_transient(req.fleet_id, labels.LOGIN_STATE_AAD, uid, req.island, req.login_state), 6)
    except (errors.HsmAuthTagMismatch, ValueError):
        raise errors.LoginStateRejected("the login state was not issued for this user") from None
    _check_fresh(ctx, expires_b, version_b, req.current, errors.LoginStateRejected,
                 "the login state has expired; start the recovery again",
                 "the login state was already used or superseded by a newer attempt")
    t = time.perf_counter()
    try:
        finished = opaque.server_login_finish(server_state, req.credential_finalization)
    except ValueError:
        raise errors.AuthenticationFailed("authentication failed") from None
    finally:
        metrics.child(metrics.HSM_OP, "opaque_recover_finish").observe(time.perf_counter() - t)
    wrap_key = HKDF(hashes.SHA256(), 32, salt=None, info=labels.RECOVERY_WRAP_INFO).derive(
        finished.get_session_key())
    rk_nonce = ctx.rng.token_bytes(12)
    wrapped = AESGCM(wrap_key).encrypt(rk_nonce, ek + k_nonce, canonical(labels.RECOVERY_WRAP_AAD, uid))
    version = req.current.version + 1
    ticket = None
    if record is not None:
        after = dataclasses.replace(record, attempts_left=record.max_attempts, not_before_ms=0)
        status = api.RecordStatus.RESET
        # Proof of this password for one change of the escrow at this version
        # (a replacing registration or a deletion); its key is this login's.
        ticket = ctx.token.seal_transient(req.fleet_id, labels.TICKET_AAD, uid, req.island, pack16(
            u64(version), u64(ctx.clock.now_ms() + TICKET_TTL_MS),
            transcripts.ticket_key(finished.get_session_key()), ctx.rng.token_bytes(16)))
    else:
        # The guess that used the last attempt was right: K goes back, the record stays gone.
        after = None
        status = api.RecordStatus.DESTROYED
    fp = transcripts.recover_finish_request(req.fleet_id, req.user_id, req.request_id, req.login_state,
                                          req.credential_finalization)
    sig = ctx.token.sign(req.fleet_id, lambda fleet: transcripts.recover_finish_answer(
        fleet, fp, wrapped, rk_nonce, status.value))
    return Outcome(after, v1.RecoverFinishOut(wrapped_key=wrapped, rk_nonce=rk_nonce, record_status=status,
                                            signature=sig, ticket=ticket), fp,
                   event(version, v1.EventKind.RECOVERED, 0 if after is None else after.attempts_left, ctx.clock))


# -- changes by proof of the password -------------------------------------------
def delete(req: api.DeleteIn, ctx: Context) -> Outcome:
    """A device deletes its live escrow with proof of its password; the
    answer, signed over its request, is what lets it act on the deletion."""
    if req.current.state is not api.EntryState.LIVE:
        raise errors.BadRequest("nothing to delete")
    uid = req.user_id.encode()
    fp = transcripts.delete_request(req.fleet_id, req.user_id, req.request_id, req.ticket)
    check_ticket(ctx, req.fleet_id, uid, req.island, req.current, req.ticket, req.ticket_proof, fp)
    version = req.current.version + 1
    sig = ctx.token.sign(req.fleet_id, lambda fleet: transcripts.delete_answer(fleet, fp, version))
    return Outcome(None, v1.DeleteOut(deleted=True, version=version, signature=sig), fp,
                   event(version, v1.EventKind.DELETED, 0, ctx.clock))


def _check_fresh(ctx: Context, expires_b: bytes, version_b: bytes, current: api.Entry,
                 rejected: type[Exception], expired: str, superseded: str) -> None:
    """What a sealed challenge, login state or ticket was bound to, checked
    after it opened: unexpired by the HSM's clock, and issued at ``current``'s
    version (so each is single use: every change moves the version)."""
    if struct.unpack(">Q", expires_b)[0] < ctx.clock.now_ms():
        raise rejected(expired)
    if struct.unpack(">Q", version_b)[0] != current.version:
        raise rejected(superseded)


def check_ticket(ctx: Context, fleet: str | None, uid: bytes, island: str, current: api.Entry,
                 ticket: bytes | None, proof: bytes | None, request: bytes) -> None:
    """The device proved the current password for this change: a change
    ticket this HSM sealed for this user and island at ``current``'s
    version, unexpired, and the device's MAC over ``request`` under the
    ticket's key (which the island relaying it never sees)."""
    if not ticket or not proof:
        raise errors.PasswordProofRequired("a live escrow is replaced or deleted only with proof of its "
                                           "password: recover it first, then send the change with its ticket")
    try:
        version_b, expires_b, key, _ = unpack16(
            ctx.token.unseal_transient(fleet, labels.TICKET_AAD, uid, island, ticket), 4)
    except (errors.HsmAuthTagMismatch, ValueError):
        raise errors.TicketRejected("the change ticket was not issued for this escrow") from None
    _check_fresh(ctx, expires_b, version_b, current, errors.TicketRejected,
                 "the change ticket has expired; recover again",
                 "the change ticket was used, or the escrow changed since; recover again")
    if not hmac.compare_digest(transcripts.ticket_proof(key, request), proof):
        raise errors.TicketRejected("the proof of the change ticket does not verify for this request")
