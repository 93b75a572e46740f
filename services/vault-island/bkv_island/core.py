"""An island's logic: read the entry, let the HSM decide, commit by CAS.

Every operation is one loop through the shared retry helper: read the
user's entry, ask the hsm-proxy for the next entry, and compare-and-swap it
in. If another replica changed the entry in between, the swap fails, nothing
the HSM produced is released, and the loop starts over from a fresh read.
That is what makes the attempt count exact under any number of replicas.
"""

from __future__ import annotations

from typing import Protocol

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

    def __init__(self, request_id: bytes, fingerprint: bytes) -> None:
        self.request_id = request_id
        self.fingerprint = fingerprint
        self.unsure = False
        self._answer = None
        self._reply: bytes | None = None

    def prepare(self, entry: hapi.Entry, answer) -> hapi.Entry:
        if entry.request is None or entry.request.id != self.request_id.hex():
            raise errors.IslandError("the HSM's entry does not carry this request")  # a bug, not an outcome
        self._answer, self._reply = answer, entry.request.reply
        return entry

    def remembered(self, stored: Stored):
        """Our own answer, if ``stored`` is the very entry this process
        prepared (another replica's commit for the same request has the same
        id and version but its own sealed reply: its answer is the one to give)."""
        req = stored.entry.request
        if self._answer is not None and req is not None and req.reply == self._reply:
            return self._answer
        return None


class Island:
    def __init__(self, island_id: str, store: RecordStore, hsm: HsmPort, *, backoff: Backoff = CAS_BACKOFF) -> None:
        self.island_id = island_id
        self._store = store
        self._hsm = hsm
        self._backoff = backoff

    async def _loop(self, op, name: str, writes: _Writes | None = None):
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

    def _start_over(self, user_id: str) -> _LostRace:
        """Drop this user's cached entry; the loop then decides again from a fresh read."""
        self._store.forget(self.island_id, user_ref(user_id))
        return _LostRace()

    async def _hsm_on(self, user_id: str, stored: Stored, call):
        """Run an HSM step on ``stored``. If the HSM refuses and our entry came
        from the cache, the cache may be stale (a version mismatch, or a record
        rewritten behind our back): drop it and start over from a fresh read,
        which then decides for good."""
        try:
            return await call
        except UpstreamError as exc:
            if stored.cached:
                raise self._start_over(user_id) from exc
            raise

    async def _answered(self, user_id: str, stored: Stored, writes: _Writes, out_type):
        """The committed answer if ``stored`` was written by this very
        request; raises if the id was used otherwise; None if it is new."""
        entry, rid = stored.entry, writes.request_id.hex()
        if entry.request is not None and entry.request.id == rid:
            if entry.request.fingerprint != writes.fingerprint.hex():
                raise errors.RequestIdReused("this request id was used for another request; nothing was done")
            if (mine := writes.remembered(stored)) is not None:
                return mine
            if stored.cached:  # answer a resend only from the newest entry: read it
                raise self._start_over(user_id)
            try:
                kept = await self._hsm.open_reply(hapi.ReplyOpenIn(
                    user_id=user_id, island=self.island_id, current=entry, request_id=writes.request_id,
                    fingerprint=writes.fingerprint))
            except UpstreamError as exc:
                # Sealed by a fleet retired since, or edited in etcd: never evaluate again.
                raise errors.RequestSuperseded("this request was answered before, and that answer can no longer "
                                               "be given; nothing was done: start the operation again") from exc
            metrics.RESENDS_ANSWERED.inc()
            return out_type.model_validate_json(kept.reply)
        if rid in entry.recent:
            if stored.cached:  # perhaps an old view: decide on a fresh read
                raise self._start_over(user_id)
            raise errors.RequestSuperseded("this request was answered before and a later change has landed since; "
                                           "nothing was done: start the operation again")
        return None

    async def _refuse(self, user_id: str, fleet_id: str | None, stored: Stored, writes: _Writes) -> None:
        """No live record: raise the fleet-signed refusal for this request."""
        if stored.entry.state is hapi.EntryState.LIVE:
            return
        if stored.cached:  # never refuse on a possibly stale view
            fresh = await self._store.read(self.island_id, user_ref(user_id), fresh=True)
            if fresh.revision != stored.revision:
                raise _LostRace()  # it moved on: decide again from the top (a resend, a new record...)
            stored = fresh
        out = await self._hsm.refusal(hapi.RefusalIn(user_id=user_id, island=self.island_id, fleet_id=fleet_id,
                                                     current=stored.entry, fingerprint=writes.fingerprint))
        if stored.entry.state is hapi.EntryState.ABSENT:
            raise errors.NoRecord("no record for this user", out.signature)
        metrics.LOCKOUT_HITS.inc()
        raise errors.RecordDestroyed("this record was destroyed after too many wrong passwords, or disabled",
                                     out.signature)

    async def _commit(self, user_id: str, revision: int, entry: hapi.Entry, writes: _Writes) -> None:
        try:
            ok = await self._store.swap(self.island_id, user_ref(user_id), revision, entry)
        except errors.StoreUnavailable:
            writes.unsure = True  # it may have landed: the next read tells (our tag)
            raise
        if not ok:
            metrics.RETRIES.labels("etcd-cas").inc()
            raise _LostRace()

    # -- registration --------------------------------------------------------------
    async def registration_start(self, req: api.RegistrationStartIn) -> api.RegistrationStartOut:
        # Fresh: the challenge is bound to this version, so it must be the real one.
        stored = await self._loop(lambda _: self._store.read(self.island_id, user_ref(req.user_id), fresh=True), "read")
        out = await self._hsm.registration_start(hapi.RegistrationStartIn(
            user_id=req.user_id, island=self.island_id, fleet_id=req.fleet_id, current=stored.entry,
            registration_request=req.registration_request))
        return api.RegistrationStartOut(**out.model_dump())

    async def registration_finish(self, req: api.RegistrationFinishIn) -> api.RegistrationFinishOut:
        writes = _Writes(req.request_id, transcripts.registration_finish_request(
            req.fleet_id, req.user_id, req.request_id, req.challenge, req.registration_upload, req.ek, req.k_nonce))

        async def attempt(_: int) -> api.RegistrationFinishOut:
            stored = await self._store.read(self.island_id, user_ref(req.user_id))
            if (done := await self._answered(req.user_id, stored, writes, api.RegistrationFinishOut)) is not None:
                return done
            out = await self._hsm_on(req.user_id, stored, self._hsm.registration_finish(hapi.RegistrationFinishIn(
                user_id=req.user_id, island=self.island_id, fleet_id=req.fleet_id, request_id=req.request_id,
                current=stored.entry, challenge=req.challenge,
                registration_upload=req.registration_upload, ek=req.ek, k_nonce=req.k_nonce)))
            answer = api.RegistrationFinishOut(version=out.new_entry.version, max_attempts=out.max_attempts,
                                               signature=out.signature)
            await self._commit(req.user_id, stored.revision, writes.prepare(out.new_entry, answer), writes)
            metrics.REGISTRATIONS.inc()
            return answer

        return await self._loop(attempt, "registration", writes)

    # -- recovery --------------------------------------------------------------------
    async def login_start(self, req: api.LoginStartIn) -> api.LoginStartOut:
        writes = _Writes(req.request_id, transcripts.login_start_request(
            req.fleet_id, req.user_id, req.request_id, req.credential_request))

        async def attempt(_: int) -> api.LoginStartOut:
            stored = await self._store.read(self.island_id, user_ref(req.user_id))
            if (done := await self._answered(req.user_id, stored, writes, api.LoginStartOut)) is not None:
                return done
            await self._refuse(req.user_id, req.fleet_id, stored, writes)
            out = await self._hsm_on(req.user_id, stored, self._hsm.login_start(hapi.LoginStartIn(
                user_id=req.user_id, island=self.island_id, fleet_id=req.fleet_id, request_id=req.request_id,
                current=stored.entry, credential_request=req.credential_request)))
            answer = api.LoginStartOut(credential_response=out.credential_response, login_state=out.login_state,
                                          attempts_left=out.attempts_left, signature=out.signature)
            # The decrement is durable on a quorum before the response leaves (invariant 3).
            await self._commit(req.user_id, stored.revision, writes.prepare(out.new_entry, answer), writes)
            metrics.GUESSES_EVALUATED.inc()
            if out.new_entry.state is hapi.EntryState.DESTROYED:
                metrics.RECORDS_DESTROYED.inc()
            return answer

        return await self._loop(attempt, "recovery", writes)

    async def login_finish(self, req: api.LoginFinishIn) -> api.LoginFinishOut:
        writes = _Writes(req.request_id, transcripts.login_finish_request(
            req.fleet_id, req.user_id, req.request_id, req.login_state, req.credential_finalization))

        async def attempt(_: int) -> api.LoginFinishOut:
            stored = await self._store.read(self.island_id, user_ref(req.user_id))
            if (done := await self._answered(req.user_id, stored, writes, api.LoginFinishOut)) is not None:
                return done
            if stored.entry.state is hapi.EntryState.ABSENT:
                # (A destroyed entry still finishes: the guess that used the last attempt may be right.)
                await self._refuse(req.user_id, req.fleet_id, stored, writes)
            out = await self._hsm_on(req.user_id, stored, self._hsm.login_finish(hapi.LoginFinishIn(
                user_id=req.user_id, island=self.island_id, fleet_id=req.fleet_id, request_id=req.request_id,
                current=stored.entry, login_state=req.login_state,
                credential_finalization=req.credential_finalization)))
            answer = api.LoginFinishOut(wrapped_key=out.wrapped_key, rk_nonce=out.rk_nonce,
                                           record_status=out.record_status, signature=out.signature)
            # Committing the reset also consumes the login state (the version moves on).
            await self._commit(req.user_id, stored.revision, writes.prepare(out.new_entry, answer), writes)
            metrics.RECOVERIES_SUCCEEDED.inc()
            return answer

        return await self._loop(attempt, "recovery", writes)

    # -- deletion and moves -----------------------------------------------------------
    async def delete(self, req: api.DeleteIn) -> api.DeleteOut:
        async def attempt(_: int) -> api.DeleteOut:
            stored = await self._store.read(self.island_id, user_ref(req.user_id), fresh=True)
            if stored.entry.state is not hapi.EntryState.LIVE:
                return api.DeleteOut(deleted=False)
            tomb = hapi.Entry(state=hapi.EntryState.DESTROYED, version=stored.entry.version + 1,
                              recent=stored.entry.answered())
            # Deleting is idempotent: a lost answer is settled by reading again.
            if not await self._store.swap(self.island_id, user_ref(req.user_id), stored.revision, tomb):
                raise _LostRace()
            return api.DeleteOut(deleted=True)

        return await self._loop(attempt, "delete")

    async def move(self, req: api.MoveIn) -> api.MoveOut:
        """Re-seal the record for ``to_island`` (the AAD binds the island) and
        move it in one transaction, version and attempt count intact."""

        async def attempt(_: int) -> api.MoveOut:
            stored = await self._store.read(self.island_id, req.user_ref, fresh=True)
            if stored.entry.state is hapi.EntryState.ABSENT:
                return api.MoveOut(moved=False)
            out = await self._hsm.reseal(hapi.ResealIn(user_ref=req.user_ref, from_island=self.island_id,
                                                       to_island=req.to_island, current=stored.entry))
            if not await self._store.move(self.island_id, req.to_island, req.user_ref, stored.revision,
                                          out.new_entry):
                raise _LostRace()
            return api.MoveOut(moved=True)

        return await self._loop(attempt, "move")

    async def migrate(self, req: api.MigrateIn) -> api.MigrateOut:
        """Re-seal one record under another fleet, in one compare-and-swap:
        a guess or recovery racing with it wins or loses the swap like any other."""
        async def attempt(_: int) -> api.MigrateOut:
            stored = await self._store.read(self.island_id, req.user_ref, fresh=True)
            if stored.entry.state is not hapi.EntryState.LIVE or stored.entry.fleet_id == req.to_fleet:
                return api.MigrateOut(migrated=False)
            out = await self._hsm.migrate(hapi.MigrateIn(user_ref=req.user_ref, island=self.island_id,
                                                         current=stored.entry, to_fleet=req.to_fleet))
            if not await self._store.swap(self.island_id, req.user_ref, stored.revision, out.new_entry):
                raise _LostRace()
            return api.MigrateOut(migrated=True)

        return await self._loop(attempt, "migrate")

    async def list_refs(self, req: api.ListRefsIn) -> api.ListRefsOut:
        return api.ListRefsOut(user_refs=await self._store.list_refs(self.island_id))
