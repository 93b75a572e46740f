"""The vault logic inside the HSM boundary, after the whitepaper.

Names follow the OPAQUE RFC's phases. Nothing here talks to etcd: the island
hands in the user's current :class:`~api.Entry` and commits the entry we hand
back with a compare-and-swap. Three rules carry the security argument:

* A CredentialResponse is produced only together with a new entry whose
  attempt count is one lower; the island must commit that entry before it
  releases the response (invariant 3). When the count reaches zero the new
  entry is a tombstone: the record is gone (invariant 2).
* Challenges and login states are sealed by the token, expire, and are bound
  to the entry version they were issued for. Every use bumps the version, so
  each can be used once (invariant 6).
* Sealed records bind user id, island, version and the fleet whose key
  sealed them in the AEAD's associated data, so they cannot be moved between
  users, islands or fleets (invariant 4).
* Every evaluation of a password under a live record's OPRF key is an
  attempt. opaque-ke derives that key from the server seed and the
  credential identifier, so each registration gets an identifier of its own
  (user id and a fresh salt the HSM seals into the challenge and the
  record): a registration start never evaluates under a live record's key
  (invariant 2).
* A live escrow changes only through its password: recovered, or replaced
  or deleted with the change ticket a successful login finish issued
  (bound to user, island and version; its key is the login's, the device's
  alone), or destroyed by spending its attempts (invariant 11).
* Every answer a device acts on is signed over the whole request it answers
  (``bkv_protocol.transcripts``), and every state change keeps its answer
  sealed in the new entry (``Entry.request``), so a resend of the same
  request is answered from the commit (:meth:`VaultHsm.open_reply`) instead of
  being evaluated again (invariant 10).

A token may hold several fleets (key generations, docs/ota.md): each request
names the fleet the client pinned (``fleet_id``; none means the oldest), which
signs the answer; a record opens with the keys of the fleet that sealed it,
and moves to another fleet only through :meth:`VaultHsm.migrate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import os
import struct
import time
from dataclasses import dataclass
from typing import Protocol

import opaque_ke_py as opaque
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bkv_protocol import labels, transcripts
from bkv_server import metrics
from bkv_protocol.encoding import b64e, canonical, fleet_id_for, u32, u64, user_ref
from bkv_protocol import hsm_api as api
from bkv_hsm_proxy import errors, islandset
from bkv_hsm_proxy import log as hlog
from bkv_hsm_proxy.hsm import OPAQUE_SETUP_LABEL, HsmBackend, generation_label
from bkv_hsm_proxy.log import IslandLog
from bkv_hsm_proxy.membership import token_admin_key
from bkv_protocol import islands, members, merkle

CHALLENGE_TTL_MS = 120_000
LOGIN_STATE_TTL_MS = 60_000
TICKET_TTL_MS = 300_000  # a recovery, then the new password typed and its registration sent
EK_LEN = api.EK_LEN  # AES-256-GCM of a 32-byte K
K_NONCE_LEN = api.K_NONCE_LEN
SALT_LEN = 16
RECORD_FORMAT = 2  # 1: the build before salted credential identifiers (no salt; still read)


def json_bytes(answer: dict) -> bytes:
    return json.dumps(answer, separators=(",", ":")).encode()


class Clock(Protocol):
    def now_ms(self) -> int: ...


class Rng(Protocol):
    def token_bytes(self, n: int) -> bytes: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class SystemRng:
    def token_bytes(self, n: int) -> bytes:
        return os.urandom(n)


# -- compact binary encodings of the sealed plaintexts ---------------------------
def _pack(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">H", len(f)) + f for f in fields)


def _unpack(data: bytes, count: int) -> list[bytes]:
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
    salt: bytes | None = None  # of the credential identifier (credential_id); None: format 1

    def __repr__(self) -> str:
        return f"Record(redacted, attempts_left={self.attempts_left})"

    def credential_id(self, uid: bytes) -> bytes:
        return credential_id(uid, self.salt)

    def pack(self) -> bytes:
        if self.salt is None:  # re-sealed as it was written: its identifier must not change
            return _pack(b"\x01", self.password_file, self.ek, self.k_nonce, u32(self.attempts_left),
                         u32(self.max_attempts))
        return _pack(bytes([RECORD_FORMAT]), self.password_file, self.ek, self.k_nonce,
                     u32(self.attempts_left), u32(self.max_attempts), self.salt)

    @classmethod
    def unpack(cls, data: bytes) -> Record:
        if data[2:3] == b"\x01":
            fmt, pf, ek, kn, left, mx = _unpack(data, 6)
            salt = None
        else:
            fmt, pf, ek, kn, left, mx, salt = _unpack(data, 7)
            if fmt != bytes([RECORD_FORMAT]) or len(salt) != SALT_LEN:
                raise ValueError("unknown record format")
        return cls(pf, ek, kn, struct.unpack(">I", left)[0], struct.unpack(">I", mx)[0], salt)


def record_aad(ref: str, island: str, version: int, fleet_id: str) -> bytes:
    """Binds the user (by ref, so records can be moved knowing only their
    keys), the island, the version and the sealing fleet."""
    return canonical(labels.RECORD_AAD, bytes.fromhex(ref), island.encode(), u64(version), fleet_id.encode())


class VaultHsm:
    """The server side of OPAQUE plus sealing and signing, over an HSM backend."""

    def __init__(self, hsm: HsmBackend, *, max_attempts: int = 10,
                 clock: Clock = SystemClock(), rng: Rng = SystemRng()) -> None:
        if not 1 <= max_attempts <= 1000:
            raise ValueError("max_attempts must be between 1 and 1000")
        self._hsm = hsm
        self._clock = clock
        self._rng = rng
        self.max_attempts = max_attempts
        self._fleets: dict[str, int] = {}  # fleet id -> key generation
        self._reload()
        setup = self._open_setup(hsm, max(self._fleets.values()))
        self._setup = opaque.ServerSetupData.from_bytes(setup)
        self.log_key = hlog.LogKey.from_setup(setup)  # the same in every hsm-proxy of the fleet, across rotations
        self.log: IslandLog | None = None  # attach_log(): serve needs it, fleet-init does not
        self._islands: islands.IslandSet | None = None  # the token's newest island set, as last read

    def _reload(self) -> None:
        gens = self._hsm.generations()
        if not gens:
            raise errors.HsmKeyMissing("no fleet keys in the token; run fleet-init")
        self._fleets = {fleet_id_for(self._hsm.public_key_der(g)): g for g in gens}
        # The oldest fleet answers requests that name none (clients from before rotation).
        self.fleet_id = min(self._fleets, key=self._fleets.get)
        self.public_key_der = self._hsm.public_key_der(self._fleets[self.fleet_id])

    @staticmethod
    def _open_setup(hsm, gen: int) -> bytes:
        sealed_setup = hsm.load_blob(generation_label(OPAQUE_SETUP_LABEL, gen))
        if sealed_setup is None:
            raise errors.HsmKeyMissing("no OPAQUE server setup in the token; run fleet-init")
        try:
            return hsm.unseal(VaultHsm._setup_aad_for(fleet_id_for(hsm.public_key_der(gen))), sealed_setup, gen)
        except errors.HsmAuthTagMismatch:
            raise errors.HsmError("the sealed OPAQUE setup does not open with this token's key") from None

    def attach_log(self, state, hsm_id: str, members: list[str], epoch: int = 1) -> None:
        self.log = IslandLog(self.log_key, hsm_id, members, state, epoch=epoch)
        for reason in ("NotAuthentic", "StaleHead", "NotNextEntry", "ProofRefused", "NoQuorum", "Frozen"):
            metrics.child(metrics.LOG_REFUSED, reason)  # a series from the start (dashboards, alerts)
        for island, head in state.heads().items():
            metrics.child(metrics.LOG_HEAD_INDEX, island).set(head.index)
        metrics.HSM_FROZEN.set(1 if state.frozen else 0)
        metrics.HSM_MEMBER_EPOCH.set(epoch)

    def fleets(self) -> dict[str, int]:
        return dict(self._fleets)

    @contextlib.contextmanager
    def _fleet_may_be_gone(self, gen: int):
        """A fleet retired by another process has no keys any more: say so
        plainly (UnknownFleet) instead of failing as an unavailable HSM."""
        try:
            yield
        except errors.HsmKeyMissing:
            self._hsm.forget(gen)
            self._reload()
            if gen not in self._fleets.values():
                raise errors.UnknownFleet("this fleet was retired; fetch the current validation bundle") from None
            raise

    def _gen(self, fleet_id: str | None) -> int:
        """The key generation of a fleet; an unknown one may be new in the
        token (rotation), so look once more before refusing."""
        if fleet_id is None:
            return self._fleets[self.fleet_id]
        if fleet_id not in self._fleets:
            self._reload()
            if fleet_id not in self._fleets:
                raise errors.UnknownFleet(f"this vault has no fleet {fleet_id}")
        return self._fleets[fleet_id]

    def __repr__(self) -> str:  # the setup is private: never in a repr
        return f"VaultHsm(fleets={sorted(self._fleets)}, opaque_setup=(redacted))"

    # -- which island holds a user (bkv_protocol.islands, bkv_hsm_proxy.islandset) ----------
    def island_set(self) -> islands.IslandSet | None:
        """The token's newest island set. The set read last is kept (parsed and
        verified once), and every use looks in the token for the next epoch --
        one object lookup -- so a set another process stored is in force at
        once: what is kept never decides more than the token's newest would."""
        self._islands = islandset.newest_after(self._hsm, self._islands)
        return self._islands

    def _island_set_for(self, what: str) -> islands.IslandSet:
        """The token's newest island set; with none yet, ``what`` is done nowhere (NoIslandSet)."""
        s = self.island_set()
        if s is None:
            raise errors.NoIslandSet(f"this vault's token holds no island set yet: no {what} anywhere until the "
                                     "admin's signed set is stored (bkv-hsm-proxy store-island-set)")
        return s

    def _settled(self, ref: str, island: str, what: str) -> None:
        """``island`` is the only place the user's record can be, by the
        token's island set (its home; while records move, its home under
        the previous islands too): else WrongIsland, and ``what`` is not done."""
        s = self._island_set_for(what)
        if not s.settled(ref, island):
            raise errors.WrongIsland(f"island {island} is not the only island this user's record can be on "
                                     f"(island set epoch {s.epoch}): no {what} here; ask again")

    def store_island_set(self, req: api.IslandSetIn) -> api.IslandSetOut:
        """Store the admin's next island set (bkv_hsm_proxy.islandset)."""
        try:
            signed = islands.SignedIslandSet.from_json(req.island_set)
        except islands.IslandSetError as exc:
            raise errors.IslandSetRefused(str(exc)) from None
        stored = islandset.store_island_set(self._hsm, signed)
        return self.island_set_out(stored)

    def island_set_out(self, stored: bool = False) -> api.IslandSetOut:
        s = self.island_set()
        if s is None:
            return api.IslandSetOut(epoch=0)
        return api.IslandSetOut(epoch=s.epoch, island_set=islandset.signed_blob(self._hsm, s.epoch).decode(),
                                stored=stored)

    # -- fleet-init ------------------------------------------------------------
    @staticmethod
    def create_opaque_setup(hsm, gen: int = 0) -> None:
        """Store the OPAQUE server setup sealed under generation ``gen``: a new
        setup for the first fleet; for a later one, the same setup re-sealed
        inside the boundary (registrations stay valid across fleets)."""
        if hsm.load_blob(generation_label(OPAQUE_SETUP_LABEL, gen)) is not None:
            return
        older = [g for g in hsm.generations() if g != gen and
                 hsm.load_blob(generation_label(OPAQUE_SETUP_LABEL, g)) is not None]
        setup = VaultHsm._open_setup(hsm, max(older)) if older else opaque.server_setup().to_bytes()
        fleet_id = fleet_id_for(hsm.public_key_der(gen))
        hsm.store_blob(generation_label(OPAQUE_SETUP_LABEL, gen),
                       hsm.seal(VaultHsm._setup_aad_for(fleet_id), setup, gen))

    @staticmethod
    def _setup_aad_for(fleet_id: str) -> bytes:
        return canonical(labels.OPAQUE_SETUP_AAD, fleet_id.encode())

    def params(self, fleet_id: str | None = None) -> api.FleetParams:
        gen = self._gen(fleet_id)
        der = self._hsm.public_key_der(gen)
        return api.FleetParams(fleet_id=fleet_id_for(der), fleet_public_key=der, max_attempts=self.max_attempts)

    # -- helpers -----------------------------------------------------------------
    def _sign(self, fleet: str | None, transcript) -> bytes:
        """``transcript(signing fleet id)``: one of ``bkv_protocol.transcripts``."""
        gen = self._gen(fleet)
        with self._fleet_may_be_gone(gen):
            return self._hsm.sign(transcript(fleet or self.fleet_id), gen)

    def _reply(self, ref: str, island: str, new_entry: api.Entry, current: api.Entry, request_id: bytes,
               fingerprint: bytes, answer: dict) -> api.Entry:
        """``new_entry`` carrying ``answer`` (the client-facing JSON, exactly as
        the island will send it) sealed for resends, and the ids of the
        requests before it. Sealed by the fleet that sealed the record."""
        gen = self._gen(new_entry.fleet_id or self.fleet_id)
        body = json_bytes(answer)
        sealed = self._hsm.seal(transcripts.reply_aad(ref, island, new_entry.version, request_id, fingerprint),
                                body, gen)
        return new_entry.model_copy(update={
            "request": api.LastRequest(id=request_id.hex(), fingerprint=fingerprint.hex(), reply=sealed),
            "recent": current.answered()})

    def _seal_transient(self, fleet: str | None, label: bytes, uid: bytes, island: str, data: bytes) -> bytes:
        """Challenges and login states: sealed by the fleet the client talks to."""
        gen = self._gen(fleet)
        with self._fleet_may_be_gone(gen):
            return self._hsm.seal(canonical(label, uid, island.encode(), (fleet or self.fleet_id).encode()), data,
                                  gen)

    def _unseal_transient(self, fleet: str | None, label: bytes, uid: bytes, island: str, blob: bytes) -> bytes:
        gen = self._gen(fleet)
        with self._fleet_may_be_gone(gen):
            return self._hsm.unseal(canonical(label, uid, island.encode(), (fleet or self.fleet_id).encode()),
                                    blob, gen)

    def _open_record(self, ref: str, island: str, entry: api.Entry) -> Record:
        if entry.state is api.EntryState.ABSENT:
            raise errors.BadRequest("no record")
        if entry.state is api.EntryState.DESTROYED or entry.sealed is None:
            raise errors.RecordDestroyed("record destroyed")
        sealer = entry.fleet_id or self.fleet_id
        try:
            gen = self._gen(sealer)
        except errors.UnknownFleet:
            raise errors.RecordIntegrityFailure("the record was sealed by a fleet this vault no longer has") from None
        try:
            return Record.unpack(self._hsm.unseal(record_aad(ref, island, entry.version, sealer), entry.sealed, gen))
        except (errors.HsmAuthTagMismatch, ValueError):
            # Swapped, rolled to another island, or tampered with: refuse, say nothing.
            raise errors.RecordIntegrityFailure("the sealed record does not open for this user") from None

    def _seal_record(self, ref: str, island: str, version: int, record: Record, fleet: str | None) -> api.Entry:
        fleet_id = fleet or self.fleet_id
        sealed = self._hsm.seal(record_aad(ref, island, version, fleet_id), record.pack(), self._gen(fleet_id))
        return api.Entry(state=api.EntryState.LIVE, version=version, sealed=sealed, fleet_id=fleet_id)

    @staticmethod
    def _opaque(step: str, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        except ValueError:
            raise errors.MalformedOpaqueMessage(f"{step}: the OPAQUE message does not parse") from None
        finally:
            metrics.child(metrics.HSM_OP, f"opaque_{step}").observe(time.perf_counter() - t)

    # -- registration ------------------------------------------------------------
    def registration_start(self, req: api.RegistrationStartIn) -> api.RegistrationStartOut:
        """Evaluates the password under a fresh credential identifier (a new
        salt, sealed into the challenge): never under a live record's OPRF
        key, so it is no guess, and changes nothing."""
        uid = req.user_id.encode()
        if req.current.state is not api.EntryState.LIVE:  # a new record: only where the island set says
            self._settled(user_ref(req.user_id), req.island, "new record")
        salt = self._rng.token_bytes(SALT_LEN)
        response = self._opaque("registration_start", opaque.server_registration_start,
                                self._setup, req.registration_request, credential_id(uid, salt)).get_message()
        expires = self._clock.now_ms() + CHALLENGE_TTL_MS
        challenge = self._seal_transient(req.fleet_id, labels.CHALLENGE_AAD, uid, req.island,
                                         _pack(u64(req.current.version), u64(expires), salt,
                                               self._rng.token_bytes(16)))
        sig = self._sign(req.fleet_id, lambda fleet: transcripts.registration_start_answer(
            fleet, req.user_id, req.registration_request, response, challenge))
        return api.RegistrationStartOut(registration_response=response, challenge=challenge, signature=sig)

    def registration_finish(self, req: api.RegistrationFinishIn) -> tuple[api.Entry, dict]:
        uid = req.user_id.encode()
        if len(req.ek) != EK_LEN or len(req.k_nonce) != K_NONCE_LEN:
            raise errors.BadRequest(f"ek must be {EK_LEN} bytes and k_nonce {K_NONCE_LEN} bytes")
        try:
            version_b, expires_b, salt, _ = _unpack(
                self._unseal_transient(req.fleet_id, labels.CHALLENGE_AAD, uid, req.island, req.challenge), 4)
        except (errors.HsmAuthTagMismatch, ValueError):
            raise errors.ChallengeRejected("the challenge was not issued for this user") from None
        if struct.unpack(">Q", expires_b)[0] < self._clock.now_ms():
            raise errors.ChallengeRejected("the challenge has expired; start the registration again")
        if struct.unpack(">Q", version_b)[0] != req.current.version:
            raise errors.ChallengeRejected("the challenge was already used or superseded")
        fp = transcripts.registration_finish_request(req.fleet_id, req.user_id, req.request_id, req.challenge,
                                                     req.registration_upload, req.ek, req.k_nonce, req.ticket)
        # Where the log shows a live escrow, only its password replaces it;
        # absent or destroyed (attempts spent, or deleted), anyone may register.
        if req.current.state is api.EntryState.LIVE:
            self._check_ticket(req.fleet_id, uid, req.island, req.current, req.ticket, req.ticket_proof, fp)
        elif req.current.state is api.EntryState.MOVED:
            raise errors.BadRequest("the record moved to another island")
        else:  # a new record (absent, or over a tombstone): only on the island the signed set says
            self._settled(user_ref(req.user_id), req.island, "new record")
        password_file = self._opaque("registration_finish", opaque.server_registration_finish,
                                     req.registration_upload).get_password_file()
        record = Record(password_file, req.ek, req.k_nonce, self.max_attempts, self.max_attempts, salt)
        ref = user_ref(req.user_id)
        entry = self._seal_record(ref, req.island, req.current.version + 1, record, req.fleet_id)
        sig = self._sign(req.fleet_id, lambda fleet: transcripts.registration_finish_answer(
            fleet, fp, entry.version, self.max_attempts))
        answer = {"version": entry.version, "max_attempts": self.max_attempts, "signature": b64e(sig)}
        return self._reply(ref, req.island, entry, req.current, req.request_id, fp, answer), answer

    # -- login (recovery) --------------------------------------------------------
    def recover_start(self, req: api.RecoverStartIn) -> tuple[api.Entry, dict]:
        uid = req.user_id.encode()
        record = self._open_record(user_ref(req.user_id), req.island, req.current)
        if record.attempts_left <= 0:  # only reachable for records written by an older build
            raise errors.RecordDestroyed("no attempts left")
        # Parse and answer first: a malformed request must not cost an attempt.
        started = self._opaque("recover_start", opaque.server_login_start,
                               self._setup, record.password_file, req.credential_request, record.credential_id(uid))
        left = record.attempts_left - 1
        version = req.current.version + 1
        if left == 0:
            new_entry = api.Entry(state=api.EntryState.DESTROYED, version=version)
        else:
            # Re-sealed by the fleet that sealed it: only migrate() changes that.
            new_entry = self._seal_record(user_ref(req.user_id), req.island, version,
                                          dataclasses.replace(record, attempts_left=left), req.current.fleet_id)
        expires = self._clock.now_ms() + LOGIN_STATE_TTL_MS
        login_state = self._seal_transient(
            req.fleet_id, labels.LOGIN_STATE_AAD, uid, req.island,
            _pack(started.get_state(), u64(version), u64(expires), record.ek, record.k_nonce,
                  self._rng.token_bytes(16)))
        response = started.get_message()
        fp = transcripts.recover_start_request(req.fleet_id, req.user_id, req.request_id, req.credential_request)
        sig = self._sign(req.fleet_id, lambda fleet: transcripts.recover_start_answer(fleet, fp, response, left))
        answer = {"credential_response": b64e(response), "login_state": b64e(login_state), "attempts_left": left,
                  "signature": b64e(sig)}
        return self._reply(user_ref(req.user_id), req.island, new_entry, req.current, req.request_id, fp,
                           answer), answer

    def recover_finish(self, req: api.RecoverFinishIn) -> tuple[api.Entry, dict]:
        uid = req.user_id.encode()
        try:
            server_state, version_b, expires_b, ek, k_nonce, _ = _unpack(
                self._unseal_transient(req.fleet_id, labels.LOGIN_STATE_AAD, uid, req.island, req.login_state), 6)
        except (errors.HsmAuthTagMismatch, ValueError):
            raise errors.LoginStateRejected("the login state was not issued for this user") from None
        if struct.unpack(">Q", expires_b)[0] < self._clock.now_ms():
            raise errors.LoginStateRejected("the login state has expired; start the recovery again")
        if struct.unpack(">Q", version_b)[0] != req.current.version:
            raise errors.LoginStateRejected("the login state was already used or superseded by a newer attempt")
        t = time.perf_counter()
        try:
            finished = opaque.server_login_finish(server_state, req.credential_finalization)
        except ValueError:
            raise errors.AuthenticationFailed("authentication failed") from None
        finally:
            metrics.child(metrics.HSM_OP, "opaque_login_finish").observe(time.perf_counter() - t)
        wrap_key = HKDF(hashes.SHA256(), 32, salt=None, info=labels.RECOVERY_WRAP_INFO).derive(
            finished.get_session_key())
        rk_nonce = self._rng.token_bytes(12)
        wrapped = AESGCM(wrap_key).encrypt(rk_nonce, ek + k_nonce, canonical(labels.RECOVERY_WRAP_AAD, uid))
        version = req.current.version + 1
        ticket = None
        if req.current.state is api.EntryState.LIVE:
            record = self._open_record(user_ref(req.user_id), req.island, req.current)
            new_entry = self._seal_record(user_ref(req.user_id), req.island, version,
                                          dataclasses.replace(record, attempts_left=record.max_attempts),
                                          req.current.fleet_id)
            status = api.RecordStatus.RESET
            # Proof of this password for one change of the escrow at this version
            # (a replacing registration or a deletion); its key is this login's.
            ticket = self._seal_transient(req.fleet_id, labels.TICKET_AAD, uid, req.island, _pack(
                u64(version), u64(self._clock.now_ms() + TICKET_TTL_MS),
                transcripts.ticket_key(finished.get_session_key()), self._rng.token_bytes(16)))
        else:
            # The guess that used the last attempt was right: K goes back, the record stays gone.
            new_entry = api.Entry(state=api.EntryState.DESTROYED, version=version)
            status = api.RecordStatus.DESTROYED
        fp = transcripts.recover_finish_request(req.fleet_id, req.user_id, req.request_id, req.login_state,
                                              req.credential_finalization)
        sig = self._sign(req.fleet_id, lambda fleet: transcripts.recover_finish_answer(
            fleet, fp, wrapped, rk_nonce, status.value))
        answer = {"wrapped_key": b64e(wrapped), "rk_nonce": b64e(rk_nonce), "record_status": status.value,
                  "signature": b64e(sig)}
        if ticket is not None:
            answer["ticket"] = b64e(ticket)
        return self._reply(user_ref(req.user_id), req.island, new_entry, req.current, req.request_id, fp,
                           answer), answer

    def _check_ticket(self, fleet: str | None, uid: bytes, island: str, current: api.Entry, ticket: bytes | None,
                      proof: bytes | None, request: bytes) -> None:
        """The device proved the current password for this change: a change
        ticket this HSM sealed for this user and island at ``current``'s
        version, unexpired, and the device's MAC over ``request`` under the
        ticket's key (which the island relaying it never sees)."""
        if not ticket or not proof:
            raise errors.PasswordProofRequired("a live escrow is replaced or deleted only with proof of its "
                                               "password: recover it first, then send the change with its ticket")
        try:
            version_b, expires_b, key, _ = _unpack(
                self._unseal_transient(fleet, labels.TICKET_AAD, uid, island, ticket), 4)
        except (errors.HsmAuthTagMismatch, ValueError):
            raise errors.TicketRejected("the change ticket was not issued for this escrow") from None
        if struct.unpack(">Q", expires_b)[0] < self._clock.now_ms():
            raise errors.TicketRejected("the change ticket has expired; recover again")
        if struct.unpack(">Q", version_b)[0] != current.version:
            raise errors.TicketRejected("the change ticket was used, or the escrow changed since; recover again")
        if not hmac.compare_digest(transcripts.ticket_proof(key, request), proof):
            raise errors.TicketRejected("the proof of the change ticket does not verify for this request")

    # -- what the log says is current ------------------------------------------------
    def _log(self) -> IslandLog:
        if self.log is None:
            raise errors.HsmError("this hsm-proxy has no state file: run init-state (docs/reliability.md)")
        return self.log

    def _proven(self, ref: str, island: str, current: api.Entry, proven: api.Proven) -> hlog.LogEntry:
        """``current`` is what the island's newest head says the record is."""
        head = _entry(proven.head)
        if head.island != island:
            raise hlog.ProofRefused("the head is another island's")
        self._log().check_head(head)
        hlog.check_proof(head, bytes.fromhex(ref), _proof(proven.proof), current)
        return head

    # -- resends and refusals ----------------------------------------------------
    def open_reply(self, req: api.ReplyOpenIn) -> api.ReplyOpenOut:
        """The committed answer to a resend of the request that wrote
        ``current``: only if ``current`` is in a head a quorum captured (an
        answer of a branch that never committed must never leave). The AAD
        checks id and fingerprint again, so an entry edited to point at
        another request opens nothing."""
        head = self._proven(user_ref(req.user_id), req.island, req.current, req.proven)
        self._log().committed(head, [_statement(s) for s in req.statements])
        last = req.current.request
        if last is None or last.id != req.request_id.hex() or last.fingerprint != req.fingerprint.hex():
            raise errors.BadRequest("this entry was not written by that request")
        gen = self._gen(req.current.fleet_id or self.fleet_id)
        try:
            body = self._hsm.unseal(transcripts.reply_aad(user_ref(req.user_id), req.island, req.current.version,
                                                          req.request_id, req.fingerprint), last.reply, gen)
        except errors.HsmAuthTagMismatch:
            raise errors.RecordIntegrityFailure("the kept answer does not open for this request") from None
        return api.ReplyOpenOut(reply=body)

    def refusal(self, req: api.RefusalIn) -> api.RefusalOut:
        """Sign ``no_record`` or ``record_destroyed`` for one request, when the
        log proves the record absent or destroyed: a device acts on neither
        unless it is signed and bound to its own request."""
        head = self._proven(user_ref(req.user_id), req.island, req.current, req.proven)
        # Only a committed state is refused: a chain of candidates that never
        # reached a quorum could otherwise "destroy" a record in a signed answer.
        self._log().committed(head, [_statement(s) for s in req.statements])
        if req.current.state not in (api.EntryState.ABSENT, api.EntryState.DESTROYED):
            raise errors.BadRequest("the record is not absent or destroyed: nothing to refuse")
        # Absent *here* says nothing if the user's record may be on another
        # island: that is the token's signed island set to say, not etcd's map.
        self._settled(user_ref(req.user_id), req.island, "signed refusal")
        # The request's fingerprint is ours to compute: it names the user whose
        # entry was just proven, so the refusal answers that user's request only.
        try:
            request = transcripts.refusable_request(transcripts.Route(req.route), req.fleet_id, req.user_id,
                                                    req.request_id, list(req.fields))
        except ValueError as exc:
            raise errors.BadRequest(f"no refusal for that request: {exc}") from None
        code = (transcripts.Refusal.NO_RECORD if req.current.state is api.EntryState.ABSENT
                else transcripts.Refusal.RECORD_DESTROYED)
        sig = self._sign(req.fleet_id, lambda fleet: transcripts.refusal_answer(fleet, request, code))
        return api.RefusalOut(code=code.value, signature=sig)

    # -- changes with no client waiting ------------------------------------------------
    def migrate(self, req: api.MigrateIn) -> tuple[api.Entry, None]:
        """Rotation: re-seal a record under another fleet's keys, attempts
        intact, version + 1 (a login state issued before finishes against the
        version it was bound to only if nothing changed since: it fails
        cleanly otherwise, and the device starts again)."""
        if req.current.state is not api.EntryState.LIVE or req.current.fleet_id == req.to_fleet:
            raise errors.BadRequest("nothing to migrate")
        record = self._open_record(req.user_ref, req.island, req.current)
        return self._seal_record(req.user_ref, req.island, req.current.version + 1, record, req.to_fleet).model_copy(
            update={"recent": req.current.answered()}), None  # a kept answer is sealed by the old fleet: refused

    def _to_home(self, ref: str, island: str) -> None:
        """A record moves only to its home under the token's island set."""
        s = self._island_set_for("move")
        if s.home(ref) != island:
            raise errors.WrongIsland(f"island {island} is not this record's home under the island set of epoch "
                                     f"{s.epoch}: it does not move there")

    def delete(self, req: api.DeleteIn) -> tuple[api.Entry, dict]:
        """A device deletes its live escrow with proof of its password; the
        answer, signed over its request, is what lets it act on the deletion."""
        if req.current.state is not api.EntryState.LIVE:
            raise errors.BadRequest("nothing to delete")
        uid = req.user_id.encode()
        fp = transcripts.delete_request(req.fleet_id, req.user_id, req.request_id, req.ticket)
        self._check_ticket(req.fleet_id, uid, req.island, req.current, req.ticket, req.ticket_proof, fp)
        version = req.current.version + 1
        sig = self._sign(req.fleet_id, lambda fleet: transcripts.delete_answer(fleet, fp, version))
        answer = {"deleted": True, "version": version, "signature": b64e(sig)}
        new_entry = api.Entry(state=api.EntryState.DESTROYED, version=version)
        return self._reply(user_ref(req.user_id), req.island, new_entry, req.current, req.request_id, fp,
                           answer), answer

    def move_out(self, req: api.MoveOutIn) -> tuple[api.Entry, None]:
        """The record leaves: MOVED, sealed for its destination at the next
        version (tombstones move as tombstones, with nothing sealed)."""
        if req.current.state not in (api.EntryState.LIVE, api.EntryState.DESTROYED) or req.to_island == req.island:
            raise errors.BadRequest("nothing to move")
        self._to_home(req.user_ref, req.to_island)
        version = req.current.version + 1
        sealed = None
        if req.current.state is api.EntryState.LIVE:
            record = self._open_record(req.user_ref, req.island, req.current)
            sealed = self._seal_record(req.user_ref, req.to_island, version, record, req.current.fleet_id).sealed
        return api.Entry(state=api.EntryState.MOVED, version=version, sealed=sealed, fleet_id=req.current.fleet_id,
                         moved_to=req.to_island, recent=req.current.answered()), None

    def move_in(self, req: api.MoveInIn) -> tuple[api.Entry, None]:
        """The record arrives, from a MOVED entry its island *committed*: a
        move that was only proposed there must not make a second live copy."""
        log = self._log()
        head = _entry(req.from_head)
        log.committed(head, [_statement(s) for s in req.from_statements])
        try:
            found = merkle.verify(head.root, bytes.fromhex(req.user_ref), merkle.Proof.from_bytes(req.from_proof))
        except ValueError:
            raise hlog.ProofRefused("the moved entry's proof does not match its island's head") from None
        moved = req.moved
        if found != hlog.entry_digest(moved) or moved.state is not api.EntryState.MOVED \
                or moved.moved_to != req.island or head.island == req.island:
            raise hlog.ProofRefused("that island's log does not say this record moved here")
        if req.current.state not in (api.EntryState.ABSENT, api.EntryState.MOVED) \
                or req.current.version >= moved.version:
            raise errors.BadRequest("the record is here already")
        self._to_home(req.user_ref, req.island)
        state = api.EntryState.LIVE if moved.sealed is not None else api.EntryState.DESTROYED
        return api.Entry(state=state, version=moved.version, sealed=moved.sealed, fleet_id=moved.fleet_id,
                         recent=moved.answered()), None

    # -- the log: apply, capture, release (log.py, docs/protocol.md) ----------------------
    def apply(self, req: api.ApplyIn) -> api.ApplyOut:
        """A batch of changes against the island's newest head: the next log
        entry and, per op, its next record entry and its answer *held* (sealed
        to the boundary until a quorum captured the entry) -- or the error
        that refused it (nothing changed). An HSM failure fails the batch."""
        log = self._log()
        head = _entry(req.head)
        try:
            log.refuse_if_frozen()  # before any OPAQUE work
            log.check_head(head)
        except errors.LogError as exc:
            metrics.child(metrics.LOG_REFUSED, type(exc).__name__).inc()
            raise
        steps = {api.OpKind.REGISTRATION_FINISH: self.registration_finish, api.OpKind.RECOVER_START: self.recover_start,
                 api.OpKind.RECOVER_FINISH: self.recover_finish, api.OpKind.MIGRATE: self.migrate,
                 api.OpKind.DELETE: self.delete, api.OpKind.MOVE_OUT: self.move_out, api.OpKind.MOVE_IN: self.move_in}
        changes, results = [], []
        for op in req.ops:
            body = op.body()
            try:
                if body is None:
                    raise errors.BadRequest(f"the op names {op.kind.value} but does not carry it")
                ref = body.user_ref if hasattr(body, "user_ref") else user_ref(body.user_id)
                if body.island != head.island:
                    raise hlog.ProofRefused("the op is for another island than the head's")
                proof = _proof(op.proof)
                # Before any OPAQUE work (the head was checked above, once); the log checks it again in apply.
                hlog.check_proof(head, bytes.fromhex(ref), proof, body.current)
                new_entry, answer = steps[op.kind](body)
            except errors.HsmError:
                raise
            except errors.HsmProxyError as exc:
                results.append((None, None, exc))
                continue
            current = None if body.current.state is api.EntryState.ABSENT else body.current
            changes.append(hlog.Change(bytes.fromhex(ref), current, proof, new_entry))
            results.append((new_entry, None if answer is None else json_bytes(answer), None))
        entry = None
        if changes:
            try:
                entry = log.apply(head, changes)
            except (hlog.ProofRefused, errors.Frozen):
                raise
            except hlog.LogError as exc:  # two ops on one record: a bug of the island's batching
                raise errors.BadRequest(str(exc)) from None
        out = []
        for new_entry, answer, exc in results:
            if exc is None:
                out.append(api.OpResult(new_entry=new_entry, held=None if answer is None else log.hold(entry, answer)))
            else:
                status, body = errors.TABLE.answer(exc)
                out.append(api.OpResult(status=status, error=body.error))
        return api.ApplyOut(entry=None if entry is None else entry_wire(entry), results=out)

    def genesis(self, island: str) -> api.LogEntry:
        return entry_wire(hlog.genesis(self.log_key, island))

    async def capture(self, req: api.CaptureIn) -> api.CaptureOut:
        """Capture ``req.entries``; with ``req.release``, then release the last
        one's held answers if our statement completes a quorum with the given
        ones (1 of 1: always), saving the island its release call."""
        log = self._log()
        writes = log.state_writes()
        try:
            s = await log.capture([_entry(e) for e in req.entries])
        except errors.LogError as exc:
            metrics.child(metrics.LOG_REFUSED, type(exc).__name__).inc()
            raise  # nothing captured: nothing released either
        finally:
            metrics.STATE_FILE_WRITES.inc(log.state_writes() - writes)
        metrics.child(metrics.LOG_CAPTURES, s.island).inc(len(req.entries))
        metrics.child(metrics.LOG_HEAD_INDEX, s.island).set(s.index)
        answers = None
        if req.release is not None:
            try:  # after the capture is durable; release's own rules, our statement beside the others
                answers = log.release(_entry(req.entries[-1]), [*map(_statement, req.release.statements), s],
                                      list(req.release.held))
            except errors.NoQuorum:
                pass  # not yet: the island gathers more statements and releases apart
        return api.CaptureOut(statement=_statement_wire(s), answers=answers)

    def release(self, req: api.ReleaseIn) -> api.ReleaseOut:
        return api.ReleaseOut(answers=self._log().release(_entry(req.entry), [_statement(s) for s in req.statements],
                                                          list(req.held)))

    def log_heads(self) -> api.LogHeadsOut:
        log = self._log()
        return api.LogHeadsOut(hsm=log.hsm_id, members=sorted(log.members), quorum=log.quorum,
                               heads={i: api.LogHead(index=h.index, mac=h.mac) for i, h in log.heads().items()},
                               epoch=log.epoch, frozen=log.frozen)

    async def freeze(self, req: api.FreezeIn) -> api.FreezeOut:
        """A change of the member set begins (bkv_hsm_proxy.membership): on
        the admin's signed order for this set, capture nothing more in it,
        durably, and say at which heads."""
        log = self._log()
        order = members.FreezeOrder(req.epoch, req.admin_public_key, req.signature)
        try:
            if members.verify_freeze(order, token_admin_key(self._hsm) or b"") != log.epoch:
                raise errors.BadRequest(f"the order freezes the set of epoch {req.epoch}; this hsm-proxy serves in "
                                        f"epoch {log.epoch}")
        except members.MemberSetError as exc:
            raise errors.BadRequest(str(exc)) from None
        fz = await log.freeze()
        metrics.HSM_FROZEN.set(1)
        return api.FreezeOut(hsm=fz.hsm, epoch=fz.epoch, tag=fz.tag, heads={
            i: api.FrozenHead(index=h.index, mac=h.mac, root=h.root) for i, h in fz.heads.items()})


def _proof(raw: bytes) -> merkle.Proof:
    try:
        return merkle.Proof.from_bytes(raw)
    except ValueError:
        raise hlog.ProofRefused("the proof does not match the head's root") from None


def _entry(w: api.LogEntry) -> hlog.LogEntry:
    return hlog.LogEntry(w.island, w.index, w.root, w.prev_mac, w.salt, w.mac)


def entry_wire(e: hlog.LogEntry) -> api.LogEntry:
    return api.LogEntry(island=e.island, index=e.index, root=e.root, prev_mac=e.prev_mac, salt=e.salt, mac=e.mac)


def _statement(w: api.Statement) -> hlog.Statement:
    return hlog.Statement(w.hsm, w.island, w.index, w.mac, w.tag)


def _statement_wire(s: hlog.Statement) -> api.Statement:
    return api.Statement(hsm=s.hsm, island=s.island, index=s.index, mac=s.mac, tag=s.tag)
