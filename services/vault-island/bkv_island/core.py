"""An island's logic: every change to a record is one loop, written once
(:meth:`Island._change`):

1. **read** the record's entry -- from this replica's cache for a client
   request, past it on the paths without a request id (delete, admin);
2. **answered?** a client request whose id the entry already carries is
   answered from that commit (a resend, or a write whose answer etcd lost),
   never evaluated again; an id the entry lists as superseded is refused;
3. **settle** what needs no HSM step: a refusal signed by the fleet (no
   live record), or an answer with nothing to write (nothing to delete);
4. **step**: the hsm-proxy (or, for a delete, the island itself) makes the
   next entry and the answer; if the HSM refuses a cached entry, the cache
   may be stale: drop it and start over from a fresh read;
5. **commit** the entry iff the record is still at the version read
   (:meth:`Island._commit`: a compare-and-swap in etcd, or for a move one
   transaction), then count it and return the answer.

If another replica changed the record in between, the commit fails, nothing
the HSM produced is released, and the loop starts over from a fresh read:
that is what makes the attempt count exact under any number of replicas.
The loop ends with ``Contended`` after the backoff's deadline, with
``StoreUnavailable`` if etcd stayed unreachable, and with ``OutcomeUnknown``
if a write's outcome was never settled (a new request could count it twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, NamedTuple, Protocol

from prometheus_client import Counter
from pydantic import BaseModel

from bkv_protocol import transcripts
from bkv_server import metrics
from bkv_protocol.retry import Backoff, DeadlineExceeded, retry
from bkv_protocol import hsm_api as hapi
from bkv_protocol import island_api as api
from bkv_island import errors
from bkv_protocol.encoding import user_ref
from bkv_server.http import UpstreamError
from bkv_island.store import RecordStore, Stored

CAS_BACKOFF = Backoff(deadline_s=8.0, first_delay_s=0.002, max_delay_s=0.2)


class HsmPort(Protocol):
    async def registration_start(self, req: hapi.RegistrationStartIn) -> hapi.RegistrationStartOut: ...
    async def registration_finish(self, req: hapi.RegistrationFinishIn) -> hapi.RegistrationFinishOut: ...
    async def login_start(self, req: hapi.LoginStartIn) -> hapi.LoginStartOut: ...
    async def login_finish(self, req: hapi.LoginFinishIn) -> hapi.LoginFinishOut: ...
    async def reseal(self, req: hapi.ResealIn) -> hapi.ResealOut: ...
    async def migrate(self, req: hapi.MigrateIn) -> hapi.ResealOut: ...


class _LostRace(Exception):
    """Another replica changed the entry between our read and our swap."""


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (_LostRace, errors.StoreUnavailable))


class _Writes:
    """The writes of one client request, all carrying its request id (the
    HSM puts it, with the answer sealed, into every entry it makes for the
    request). When etcd loses the answer to a write, or the client resends
    the request, the next read shows whether it landed: then the request is
    answered from the commit -- from memory in this process, else by having
    the HSM open the answer kept in the entry -- never evaluated again, which
    would take a second attempt."""

    def __init__(self, user_id: str, request_id: bytes, fingerprint: bytes, out_type: type[BaseModel]) -> None:
        self.user_id = user_id
        self.request_id = request_id
        self.fingerprint = fingerprint
        self.out_type = out_type  # the answer's type, to open a kept answer into
        self.unsure = False
        self._answer = None
        self._reply: bytes | None = None

    def prepare(self, entry: hapi.Entry, answer) -> None:
        if entry.request is None or entry.request.id != self.request_id.hex():
            raise errors.IslandError("the HSM's entry does not carry this request")  # a bug, not an outcome
        self._answer, self._reply = answer, entry.request.reply

    def remembered(self, stored: Stored):
        """Our own answer, if ``stored`` is the very entry this process
        prepared (another replica's commit for the same request has the same
        id and version but its own sealed reply: its answer is the one to give)."""
        req = stored.entry.request
        if self._answer is not None and req is not None and req.reply == self._reply:
            return self._answer
        return None


class _Next(NamedTuple):
    """What a step made: the entry to commit, the answer to give once it is
    committed, and the counters that commit moves."""
    entry: hapi.Entry
    answer: BaseModel
    counts: tuple[Counter, ...] = ()


@dataclass(frozen=True)
class _Op:
    """One state-changing operation, as the loop runs it."""
    name: str  # for the Contended message
    ref: str  # the record's key (user_ref)
    step: Callable[[Stored], Awaitable[_Next]]
    writes: _Writes | None = None  # a client request; None: delete and admin paths (idempotent)
    settle: Callable[[Stored], Awaitable[Any]] | None = None  # a refusal (raises), an answer, or None: go on
    to_island: str | None = None  # a move: the commit writes the entry there


class Island:
    def __init__(self, island_id: str, store: RecordStore, hsm: HsmPort, *, backoff: Backoff = CAS_BACKOFF) -> None:
        self.island_id = island_id
        self._store = store
        self._hsm = hsm
        self._backoff = backoff

    # -- the one loop --------------------------------------------------------------
    async def _change(self, op: _Op):
        """Read, answered?, settle, step, commit (the module docstring), until
        it returns or the backoff's deadline passes."""

        async def attempt(_: int):
            stored = await self._store.read(self.island_id, op.ref, fresh=op.writes is None)
            if op.writes is not None and (done := await self._answered(op.ref, stored, op.writes)) is not None:
                return done
            if op.settle is not None and (done := await op.settle(stored)) is not None:
                return done
            try:
                nxt = await op.step(stored)
            except UpstreamError as exc:
                if stored.cached:  # the HSM refused a perhaps stale view: decide again on a fresh read
                    raise self._start_over(op.ref) from exc
                raise
            await self._commit(op, stored, nxt)
            for counter in nxt.counts:
                counter.inc()
            return nxt.answer

        return await self._retry(attempt, op.name, op.writes)

    async def _commit(self, op: _Op, stored: Stored, nxt: _Next) -> None:
        """Make ``nxt.entry`` the record iff it is still at the revision read
        (a move: in one transaction, under ``op.to_island``); else _LostRace.
        The one place that says what committing is, so it can be replaced whole."""
        if op.writes is not None:
            op.writes.prepare(nxt.entry, nxt.answer)
        try:
            if op.to_island is None:
                ok = await self._store.swap(self.island_id, op.ref, stored.revision, nxt.entry)
            else:
                ok = await self._store.move(self.island_id, op.to_island, op.ref, stored.revision, nxt.entry)
        except errors.StoreUnavailable:
            if op.writes is not None:
                op.writes.unsure = True  # it may have landed: the next read tells (our tag)
            raise
        if not ok:
            metrics.RETRIES.labels("etcd-cas").inc()
            raise _LostRace()

    async def _retry(self, op, name: str, writes: _Writes | None = None):
        try:
            return await retry(op, retry_on=_retryable, backoff=self._backoff)
        except DeadlineExceeded as exc:
            if writes is not None and writes.unsure:
                # Never settled whether a write landed: a new request could count the guess twice.
                raise errors.OutcomeUnknown("etcd lost the answer to a write; this attempt may or may not have "
                                            "been counted") from exc
            if isinstance(exc.__cause__, errors.StoreUnavailable):
                raise errors.StoreUnavailable("etcd unreachable; try again shortly") from exc
            raise errors.Contended(f"{name}: too many concurrent changes to this record; try again") from exc

    def _start_over(self, ref: str) -> _LostRace:
        """Drop this record's cached entry; the loop then decides again from a fresh read."""
        self._store.forget(self.island_id, ref)
        return _LostRace()

    async def _answered(self, ref: str, stored: Stored, writes: _Writes):
        """The committed answer if ``stored`` was written by this very
        request; raises if the id was used otherwise; None if it is new."""
        entry, rid = stored.entry, writes.request_id.hex()
        if entry.request is not None and entry.request.id == rid:
            if entry.request.fingerprint != writes.fingerprint.hex():
                raise errors.RequestIdReused("this request id was used for another request; nothing was done")
            if (mine := writes.remembered(stored)) is not None:
                return mine
            if stored.cached:  # answer a resend only from the newest entry: read it
                raise self._start_over(ref)
            try:
                kept = await self._hsm.open_reply(hapi.ReplyOpenIn(
                    user_id=writes.user_id, island=self.island_id, current=entry, request_id=writes.request_id,
                    fingerprint=writes.fingerprint))
            except UpstreamError as exc:
                # Sealed by a fleet retired since, or edited in etcd: never evaluate again.
                raise errors.RequestSuperseded("this request was answered before, and that answer can no longer "
                                               "be given; nothing was done: start the operation again") from exc
            metrics.RESENDS_ANSWERED.inc()
            return writes.out_type.model_validate_json(kept.reply)
        if rid in entry.recent:
            if stored.cached:  # perhaps an old view: decide on a fresh read
                raise self._start_over(ref)
            raise errors.RequestSuperseded("this request was answered before and a later change has landed since; "
                                           "nothing was done: start the operation again")
        return None

    async def _refuse(self, fleet_id: str | None, stored: Stored, writes: _Writes) -> None:
        """No live record: raise the fleet-signed refusal for this request."""
        if stored.entry.state is hapi.EntryState.LIVE:
            return
        if stored.cached:  # never refuse on a possibly stale view
            fresh = await self._store.read(self.island_id, user_ref(writes.user_id), fresh=True)
            if fresh.revision != stored.revision:
                raise _LostRace()  # it moved on: decide again from the top (a resend, a new record...)
            stored = fresh
        out = await self._hsm.refusal(hapi.RefusalIn(user_id=writes.user_id, island=self.island_id,
                                                     fleet_id=fleet_id, current=stored.entry,
                                                     fingerprint=writes.fingerprint))
        if stored.entry.state is hapi.EntryState.ABSENT:
            raise errors.NoRecord("no record for this user", out.signature)
        metrics.LOCKOUT_HITS.inc()
        raise errors.RecordDestroyed("this record was destroyed after too many wrong passwords, or disabled",
                                     out.signature)

    # -- registration --------------------------------------------------------------
    async def registration_start(self, req: api.RegistrationStartIn) -> api.RegistrationStartOut:
        # Changes nothing. Fresh: the challenge is bound to this version, so it must be the real one.
        stored = await self._retry(lambda _: self._store.read(self.island_id, user_ref(req.user_id), fresh=True),
                                   "read")
        out = await self._hsm.registration_start(hapi.RegistrationStartIn(
            user_id=req.user_id, island=self.island_id, fleet_id=req.fleet_id, current=stored.entry,
            registration_request=req.registration_request))
        return api.RegistrationStartOut(**out.model_dump())

    async def registration_finish(self, req: api.RegistrationFinishIn) -> api.RegistrationFinishOut:
        async def step(stored: Stored) -> _Next:
            out = await self._hsm.registration_finish(hapi.RegistrationFinishIn(
                user_id=req.user_id, island=self.island_id, fleet_id=req.fleet_id, request_id=req.request_id,
                current=stored.entry, challenge=req.challenge,
                registration_upload=req.registration_upload, ek=req.ek, k_nonce=req.k_nonce))
            return _Next(out.new_entry, api.RegistrationFinishOut(
                version=out.new_entry.version, max_attempts=out.max_attempts, signature=out.signature),
                (metrics.REGISTRATIONS,))

        return await self._change(_Op("registration", user_ref(req.user_id), step, _Writes(
            req.user_id, req.request_id, transcripts.registration_finish_request(
                req.fleet_id, req.user_id, req.request_id, req.challenge, req.registration_upload, req.ek,
                req.k_nonce), api.RegistrationFinishOut)))

    # -- recovery --------------------------------------------------------------------
    async def login_start(self, req: api.LoginStartIn) -> api.LoginStartOut:
        writes = _Writes(req.user_id, req.request_id, transcripts.login_start_request(
            req.fleet_id, req.user_id, req.request_id, req.credential_request), api.LoginStartOut)

        async def settle(stored: Stored) -> None:
            await self._refuse(req.fleet_id, stored, writes)

        async def step(stored: Stored) -> _Next:
            out = await self._hsm.login_start(hapi.LoginStartIn(
                user_id=req.user_id, island=self.island_id, fleet_id=req.fleet_id, request_id=req.request_id,
                current=stored.entry, credential_request=req.credential_request))
            # The decrement is durable on a quorum before the response leaves (invariant 3).
            counts = (metrics.GUESSES_EVALUATED,)
            if out.new_entry.state is hapi.EntryState.DESTROYED:
                counts += (metrics.RECORDS_DESTROYED,)
            return _Next(out.new_entry, api.LoginStartOut(
                credential_response=out.credential_response, login_state=out.login_state,
                attempts_left=out.attempts_left, signature=out.signature), counts)

        return await self._change(_Op("recovery", user_ref(req.user_id), step, writes, settle))

    async def login_finish(self, req: api.LoginFinishIn) -> api.LoginFinishOut:
        writes = _Writes(req.user_id, req.request_id, transcripts.login_finish_request(
            req.fleet_id, req.user_id, req.request_id, req.login_state, req.credential_finalization),
            api.LoginFinishOut)

        async def settle(stored: Stored) -> None:
            # (A destroyed entry still finishes: the guess that used the last attempt may be right.)
            if stored.entry.state is hapi.EntryState.ABSENT:
                await self._refuse(req.fleet_id, stored, writes)

        async def step(stored: Stored) -> _Next:
            out = await self._hsm.login_finish(hapi.LoginFinishIn(
                user_id=req.user_id, island=self.island_id, fleet_id=req.fleet_id, request_id=req.request_id,
                current=stored.entry, login_state=req.login_state,
                credential_finalization=req.credential_finalization))
            # Committing the reset also consumes the login state (the version moves on).
            return _Next(out.new_entry, api.LoginFinishOut(
                wrapped_key=out.wrapped_key, rk_nonce=out.rk_nonce, record_status=out.record_status,
                signature=out.signature), (metrics.RECOVERIES_SUCCEEDED,))

        return await self._change(_Op("recovery", user_ref(req.user_id), step, writes, settle))

    # -- deletion and moves -----------------------------------------------------------
    # No request id: each is idempotent, so a lost answer is settled by running it again.
    async def delete(self, req: api.DeleteIn) -> api.DeleteOut:
        async def settle(stored: Stored) -> api.DeleteOut | None:
            return None if stored.entry.state is hapi.EntryState.LIVE else api.DeleteOut(deleted=False)

        async def step(stored: Stored) -> _Next:  # the island's own step: a tombstone needs no HSM
            return _Next(hapi.Entry(state=hapi.EntryState.DESTROYED, version=stored.entry.version + 1,
                                    recent=stored.entry.answered()), api.DeleteOut(deleted=True))

        return await self._change(_Op("delete", user_ref(req.user_id), step, settle=settle))

    async def move(self, req: api.MoveIn) -> api.MoveOut:
        """Re-seal the record for ``to_island`` (the AAD binds the island) and
        move it in one transaction, version and attempt count intact."""

        async def settle(stored: Stored) -> api.MoveOut | None:
            return api.MoveOut(moved=False) if stored.entry.state is hapi.EntryState.ABSENT else None

        async def step(stored: Stored) -> _Next:
            out = await self._hsm.reseal(hapi.ResealIn(user_ref=req.user_ref, from_island=self.island_id,
                                                       to_island=req.to_island, current=stored.entry))
            return _Next(out.new_entry, api.MoveOut(moved=True))

        return await self._change(_Op("move", req.user_ref, step, settle=settle, to_island=req.to_island))

    async def migrate(self, req: api.MigrateIn) -> api.MigrateOut:
        """Re-seal one record under another fleet, in one compare-and-swap:
        a guess or recovery racing with it wins or loses the swap like any other."""

        async def settle(stored: Stored) -> api.MigrateOut | None:
            done = stored.entry.state is not hapi.EntryState.LIVE or stored.entry.fleet_id == req.to_fleet
            return api.MigrateOut(migrated=False) if done else None

        async def step(stored: Stored) -> _Next:
            out = await self._hsm.migrate(hapi.MigrateIn(user_ref=req.user_ref, island=self.island_id,
                                                         current=stored.entry, to_fleet=req.to_fleet))
            return _Next(out.new_entry, api.MigrateOut(migrated=True))

        return await self._change(_Op("migrate", req.user_ref, step, settle=settle))

    async def list_refs(self, req: api.ListRefsIn) -> api.ListRefsOut:
        return api.ListRefsOut(user_refs=await self._store.list_refs(self.island_id))
