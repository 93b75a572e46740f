"""The HSM boundary: the log's rules around the record operations, after the
whitepaper and Juicebox's ``hsm_core``.

Three files, one per seam:

* ``records.py`` -- the record operations (registration, recovery, deletion)
  as functions of the request and the opened record: the next record and
  the typed answer. The guess limit is read there.
* ``keys.py`` -- the token's key generations (fleets), the OPAQUE server
  setup, sealing and signing.
* here, :class:`VaultHsm` -- the boundary: every change is applied under the
  island's log (apply, capture, release, ``log.py``), resends are answered
  from the commit, refusals are signed, the admin's member-set freezes and
  island sets are obeyed, and records move between fleets and islands.

Nothing here talks to etcd: the island hands in the user's current
:class:`~api.Entry` with its proof against the log, and the rules that
carry the security argument are:

* A CredentialResponse is produced only together with a new entry whose
  attempt count is one lower; it is held until a quorum of hsm-proxies
  captured that entry (invariant 3). When the count reaches zero the new
  entry is a tombstone: the record is gone (invariant 2).
* Challenges and login states are sealed by the token, expire, and are bound
  to the entry version they were issued for. Every use bumps the version, so
  each can be used once (invariant 6).
* Sealed records bind user id, island, version and the fleet whose key
  sealed them in the AEAD's associated data, so they cannot be moved between
  users, islands or fleets (invariant 4).
* Every evaluation of a password under a live record's OPRF key is an
  attempt: each registration gets a credential identifier of its own
  (``records.credential_id``), so a registration start never evaluates
  under a live record's key (invariant 2).
* A live escrow changes only through its password: recovered, or replaced
  or deleted with the change ticket a successful recover finish issued
  (bound to user, island and version; its key is the login's, the device's
  alone), or destroyed by spending its attempts (invariant 11).
* Every change chains the account's event into the entry it makes
  (``Entry.events_head``, :func:`chained`), and the feed's head is signed
  only as a committed head proves it (:meth:`VaultHsm.events`): an island
  can drop the oldest events it shows, never hide a later one unseen.
* Every answer a device acts on is signed over the whole request it answers
  (``bkv_protocol.transcripts``), and every state change keeps its answer
  sealed in the new entry (``Entry.request``), so a resend of the same
  request is answered from the commit (:meth:`VaultHsm.open_reply`) instead of
  being evaluated again (invariant 10).

A record opens with the keys of the fleet that sealed it, and moves to
another fleet only through :meth:`VaultHsm.migrate`.
"""

from __future__ import annotations

import json
import os
import time

import opaque_ke_py as opaque
from pydantic import BaseModel

from bkv_protocol import transcripts, v1
from bkv_server import metrics
from bkv_protocol.encoding import fleet_id_for, user_ref
from bkv_protocol import hsm_api as api
from bkv_hsm_proxy import errors, islandset, keys, records
from bkv_hsm_proxy import log as hlog
from bkv_hsm_proxy.hsm import HsmBackend
from bkv_hsm_proxy.log import IslandLog
from bkv_hsm_proxy.membership import token_admin_key
from bkv_hsm_proxy.records import Clock, Rng
from bkv_protocol import islands, members, merkle


def json_bytes(answer: BaseModel) -> bytes:
    """The client-facing JSON of an answer, exactly as it is held, kept for
    resends and relayed: the model's JSON dict (fields in the model's order,
    ``None`` fields left out where the model says), compact -- the bytes of
    the dicts the answers were built as before the typed answers, which a
    resend compares (tests/test_unit_record_answers.py)."""
    return json.dumps(answer.model_dump(mode="json"), separators=(",", ":")).encode()


def chained(new_entry: api.Entry, current: api.Entry, event: v1.Event) -> api.Entry:
    """``new_entry`` with the account's event chain after ``event``
    (``current``'s chain, empty for entries from before the feed, extended)."""
    head = transcripts.event_chain(current.events_head or transcripts.EVENTS_EMPTY, transcripts.event_bytes(
        event.version, event.kind.value, event.attempts_left, event.at_ms))
    return new_entry.model_copy(update={"events_head": head})


# What a change makes: the next entry, the answer a client waits for (None: an operator's
# change), and the account's event for it.
Change = tuple[api.Entry, "BaseModel | None", v1.Event]


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class SystemRng:
    def token_bytes(self, n: int) -> bytes:
        return os.urandom(n)


class VaultHsm:
    """The HSM boundary: the record operations (``records``) under the
    island's log, over the token's keys (``keys``)."""

    def __init__(self, hsm: HsmBackend, *, max_attempts: int = 10, guess_delays_s: tuple[int, ...] = (),
                 clock: Clock = SystemClock(), rng: Rng = SystemRng()) -> None:
        """``guess_delays_s``: the wait after each attempt spent
        (``records.DEFAULT_GUESS_DELAYS_S``; settings.py's default); empty: none."""
        if not 1 <= max_attempts <= 1000:
            raise ValueError("max_attempts must be between 1 and 1000")
        self._hsm = hsm
        self.max_attempts = max_attempts
        self.keys = keys.Keys(hsm)
        setup = keys.open_setup(hsm, max(self.keys.fleets().values()))
        self._setup = opaque.ServerSetupData.from_bytes(setup)
        self.log_key = hlog.LogKey.from_setup(setup)  # the same in every hsm-proxy of the fleet, across rotations
        self.log: IslandLog | None = None  # attach_log(): serve needs it, fleet-init does not
        self._islands: islands.IslandSet | None = None  # the token's newest island set, as last read
        self._clock = clock
        self._ops = records.Context(max_attempts, self._setup, self.keys, clock, rng, self._settled,
                                    records.check_guess_delays(guess_delays_s))

    def attach_log(self, state, hsm_id: str, members: list[str], epoch: int = 1) -> None:
        self.log = IslandLog(self.log_key, hsm_id, members, state, epoch=epoch)
        for reason in ("NotAuthentic", "StaleHead", "NotNextEntry", "ProofRefused", "NoQuorum", "Frozen"):
            metrics.child(metrics.LOG_REFUSED, reason)  # a series from the start (dashboards, alerts)
        for island, head in state.heads().items():
            metrics.child(metrics.LOG_HEAD_INDEX, island).set(head.index)
        metrics.HSM_FROZEN.set(1 if state.frozen else 0)
        metrics.HSM_MEMBER_EPOCH.set(epoch)

    @property
    def fleet_id(self) -> str:
        """The oldest fleet: it answers requests that name none."""
        return self.keys.fleet_id

    @property
    def public_key_der(self) -> bytes:
        return self.keys.public_key_der

    def fleets(self) -> dict[str, int]:
        return self.keys.fleets()

    def __repr__(self) -> str:  # the setup is private: never in a repr
        return f"VaultHsm(fleets={sorted(self.keys.fleets())}, opaque_setup=(redacted))"

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
    create_opaque_setup = staticmethod(keys.create_opaque_setup)

    def params(self, fleet_id: str | None = None) -> api.FleetParams:
        gen = self.keys.gen(fleet_id)
        der = self._hsm.public_key_der(gen)
        return api.FleetParams(fleet_id=fleet_id_for(der), fleet_public_key=der, max_attempts=self.max_attempts)

    # -- the record operations, under the log (records.py) -------------------------
    def _reply(self, ref: str, island: str, new_entry: api.Entry, current: api.Entry, request_id: bytes,
               fingerprint: bytes, answer: BaseModel) -> api.Entry:
        """``new_entry`` carrying ``answer`` (the client-facing JSON, exactly as
        the island will send it) sealed for resends, and the ids of the
        requests before it. Sealed by the fleet that sealed the record."""
        body = json_bytes(answer)
        sealed = self.keys.seal_reply(transcripts.reply_aad(ref, island, new_entry.version, request_id, fingerprint),
                                      body, new_entry.fleet_id)
        return new_entry.model_copy(update={
            "request": api.LastRequest(id=request_id.hex(), fingerprint=fingerprint.hex(), reply=sealed),
            "recent": current.answered()})

    def _next(self, ref: str, island: str, current: api.Entry, request_id: bytes, done: records.Outcome,
              fleet: str | None) -> Change:
        """The entry after ``current``: ``done.record`` sealed by ``fleet`` at
        the next version (no record: a tombstone), its answer kept for resends,
        its event chained."""
        version = current.version + 1
        if done.record is None:
            new_entry = api.Entry(state=api.EntryState.DESTROYED, version=version)
        else:
            new_entry = self.keys.seal_record(ref, island, version, done.record, fleet)
        new_entry = chained(new_entry, current, done.event)
        return (self._reply(ref, island, new_entry, current, request_id, done.fingerprint, done.answer), done.answer,
                done.event)

    def registration_start(self, req: api.RegistrationStartIn) -> v1.RegistrationStartOut:
        """Changes nothing (records.registration_start): answered at once, no log."""
        return records.registration_start(req, self._ops)

    def registration_finish(self, req: api.RegistrationFinishIn) -> Change:
        done = records.registration_finish(req, self._ops)
        return self._next(user_ref(req.user_id), req.island, req.current, req.request_id, done, req.fleet_id)

    def recover_start(self, req: api.RecoverStartIn) -> Change:
        ref = user_ref(req.user_id)
        record = self.keys.open_record(ref, req.island, req.current)
        done = records.recover_start(req, record, self._ops)
        # Re-sealed by the fleet that sealed it: only migrate() changes that.
        return self._next(ref, req.island, req.current, req.request_id, done, req.current.fleet_id)

    def recover_finish(self, req: api.RecoverFinishIn) -> Change:
        ref = user_ref(req.user_id)
        record = (self.keys.open_record(ref, req.island, req.current)
                  if req.current.state is api.EntryState.LIVE else None)
        done = records.recover_finish(req, record, self._ops)
        return self._next(ref, req.island, req.current, req.request_id, done, req.current.fleet_id)

    def delete(self, req: api.DeleteIn) -> Change:
        done = records.delete(req, self._ops)
        return self._next(user_ref(req.user_id), req.island, req.current, req.request_id, done, None)

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
        try:
            body = self.keys.open_reply(transcripts.reply_aad(user_ref(req.user_id), req.island, req.current.version,
                                                              req.request_id, req.fingerprint), last.reply,
                                        req.current.fleet_id)
        except errors.HsmAuthTagMismatch:
            raise errors.RecordIntegrityFailure("the kept answer does not open for this request") from None
        return api.ReplyOpenOut(reply=body)

    def refusal(self, req: api.RefusalIn) -> api.RefusalOut:
        """Sign ``no_record`` or ``record_destroyed`` when the log proves the
        record absent or destroyed: over that state (user, island, version),
        signed once and served again (``records.StateAnswers``); for an island
        built before, which names the request, over that request. A device
        acts on neither unless it verifies (docs/protocol.md, "Refusals")."""
        head = self._proven(user_ref(req.user_id), req.island, req.current, req.proven)
        # Only a committed state is refused: a chain of candidates that never
        # reached a quorum could otherwise "destroy" a record in a signed answer.
        self._log().committed(head, [_statement(s) for s in req.statements])
        if req.current.state not in (api.EntryState.ABSENT, api.EntryState.DESTROYED):
            raise errors.BadRequest("the record is not absent or destroyed: nothing to refuse")
        # Absent *here* says nothing if the user's record may be on another
        # island: that is the token's signed island set to say, not etcd's map.
        self._settled(user_ref(req.user_id), req.island, "signed refusal")
        code = (transcripts.Refusal.NO_RECORD if req.current.state is api.EntryState.ABSENT
                else transcripts.Refusal.RECORD_DESTROYED)
        if req.route is None:  # the per-state form: user and island as proven, the proven entry's version
            sig, state = self._ops.states.answer(self.keys, req.fleet_id, req.user_id, req.island,
                                                 req.current.version, code)
            return api.RefusalOut(code=code.value, signature=sig, state=state)
        if req.request_id is None:
            raise errors.BadRequest("a refusal for a request names its request id")
        # The request's fingerprint is ours to compute: it names the user whose
        # entry was just proven, so the refusal answers that user's request only.
        try:
            request = transcripts.refusable_request(transcripts.Route(req.route), req.fleet_id, req.user_id,
                                                    req.request_id, list(req.fields))
        except ValueError as exc:
            raise errors.BadRequest(f"no refusal for that request: {exc}") from None
        sig = self.keys.sign(req.fleet_id, lambda fleet: transcripts.refusal_answer(fleet, request, code))
        return api.RefusalOut(code=code.value, signature=sig)

    def events(self, req: api.EventsReadIn) -> api.EventsSigned:
        """Sign the account's event feed head: the version and event chain of
        its entry as a committed head proves it, for the device's nonce. The
        events are the island's to show; the device checks they chain to this."""
        read = req.read
        head = self._proven(user_ref(read.user_id), read.island, read.current, req.proven)
        # Only a committed state: a candidate that never reached a quorum is no event.
        self._log().committed(head, [_statement(s) for s in req.statements])
        if read.current.state is api.EntryState.MOVED:
            raise errors.BadRequest("the record moved to another island: its feed is read there")
        if read.current.state is api.EntryState.ABSENT:
            # "No events" is true only where the signed island set places the user.
            self._settled(user_ref(read.user_id), read.island, "signed event feed")
        events_head = read.current.events_head or transcripts.EVENTS_EMPTY
        sig = self.keys.sign(read.fleet_id, lambda fleet: transcripts.events_answer(
            fleet, read.user_id, read.current.version, events_head, read.nonce))
        return api.EventsSigned(version=read.current.version, head=events_head, signature=sig)

    # -- changes with no client waiting ------------------------------------------------
    def migrate(self, req: api.MigrateIn) -> Change:
        """Rotation: re-seal a record under another fleet's keys, attempts
        intact, version + 1 (a login state issued before finishes against the
        version it was bound to only if nothing changed since: it fails
        cleanly otherwise, and the device starts again)."""
        if req.current.state is not api.EntryState.LIVE or req.current.fleet_id == req.to_fleet:
            raise errors.BadRequest("nothing to migrate")
        record = self.keys.open_record(req.user_ref, req.island, req.current)
        version = req.current.version + 1
        event = records.event(version, v1.EventKind.REKEYED, record.attempts_left, self._clock)
        new_entry = self.keys.seal_record(req.user_ref, req.island, version, record, req.to_fleet).model_copy(
            update={"recent": req.current.answered()})  # a kept answer is sealed by the old fleet: refused
        return chained(new_entry, req.current, event), None, event

    def _to_home(self, ref: str, island: str) -> None:
        """A record moves only to its home under the token's island set."""
        s = self._island_set_for("move")
        if s.home(ref) != island:
            raise errors.WrongIsland(f"island {island} is not this record's home under the island set of epoch "
                                     f"{s.epoch}: it does not move there")

    def move_out(self, req: api.MoveOutIn) -> Change:
        """The record leaves: MOVED, sealed for its destination at the next
        version (tombstones move as tombstones, with nothing sealed)."""
        if req.current.state not in (api.EntryState.LIVE, api.EntryState.DESTROYED) or req.to_island == req.island:
            raise errors.BadRequest("nothing to move")
        self._to_home(req.user_ref, req.to_island)
        version = req.current.version + 1
        sealed, left = None, 0
        if req.current.state is api.EntryState.LIVE:
            record = self.keys.open_record(req.user_ref, req.island, req.current)
            sealed = self.keys.seal_record(req.user_ref, req.to_island, version, record, req.current.fleet_id).sealed
            left = record.attempts_left
        event = records.event(version, v1.EventKind.MOVED, left, self._clock)
        moved = api.Entry(state=api.EntryState.MOVED, version=version, sealed=sealed, fleet_id=req.current.fleet_id,
                          moved_to=req.to_island, recent=req.current.answered())
        return chained(moved, req.current, event), None, event

    def move_in(self, req: api.MoveInIn) -> tuple[api.Entry, None, None]:
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
        # Same version, no new event: the feed's chain arrives with the record.
        return api.Entry(state=state, version=moved.version, sealed=moved.sealed, fleet_id=moved.fleet_id,
                         recent=moved.answered(), events_head=moved.events_head), None, None

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
                new_entry, answer, event = steps[op.kind](body)
            except errors.HsmError:
                raise
            except errors.HsmProxyError as exc:
                results.append((None, None, None, exc))
                continue
            current = None if body.current.state is api.EntryState.ABSENT else body.current
            changes.append(hlog.Change(bytes.fromhex(ref), current, proof, new_entry))
            results.append((new_entry, None if answer is None else json_bytes(answer), event, None))
        entry = None
        if changes:
            try:
                entry = log.apply(head, changes)
            except (hlog.ProofRefused, errors.Frozen):
                raise
            except hlog.LogError as exc:  # two ops on one record: a bug of the island's batching
                raise errors.BadRequest(str(exc)) from None
        out = []
        for new_entry, answer, event, exc in results:
            if exc is None:
                out.append(api.OpResult(new_entry=new_entry, held=None if answer is None else log.hold(entry, answer),
                                        event=event))
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
