"""An island's logic. Every change to a record is one op through the
island's log (:class:`bkv_island.ledger.Ledger`), written once
(:meth:`Island._change`):

1. **build**, when the op's batch goes, from what the log says the record is
   now: a client request whose id the entry already carries is answered from
   that commit (a resend) and never evaluated again; an id the entry lists as
   superseded is refused; what needs no HSM step is settled (a signed
   refusal when there is no live record, an answer when there is nothing to
   do); else the op for the hsm-proxy, with the record's trie proof;
2. the ledger has the boundary **apply** the batch, **appends** it to etcd
   iff the log head is still ours (else: catch up and build again), and has
   the hsm-proxies **capture** it and the boundary **release** the answers.

If another replica appended first, nothing the boundary produced is
released and the batch is built again from the newer log: that is what
makes the attempt count exact under any number of replicas, and the
boundary -- not etcd -- decides what is current (issue #17).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from prometheus_client import Counter
from pydantic import BaseModel

from bkv_island import errors
from bkv_island.ledger import Ledger
from bkv_island.store import carried
from bkv_protocol import hsm_api as hapi
from bkv_protocol import island_api as api
from bkv_protocol import operations as ops
from bkv_protocol import transcripts
from bkv_protocol.encoding import user_ref
from bkv_protocol.wire import ErrorCode as C
from bkv_server import metrics
from bkv_server.http import ServiceClient, UpstreamError, UpstreamUnavailable

REMEMBERED_ANSWERS = 10_000  # answers kept in memory for resends to this replica
REMEMBERED_REFUSALS = 10_000  # signed per-state refusals kept in memory, served again without the hsm-proxy


class HsmPort(Protocol):
    async def registration_start(self, req: hapi.RegistrationStartIn) -> hapi.RegistrationStartOut: ...
    async def open_reply(self, req: hapi.ReplyOpenIn) -> hapi.ReplyOpenOut: ...
    async def refusal(self, req: hapi.RefusalIn) -> hapi.RefusalOut: ...
    async def events(self, req: hapi.EventsReadIn) -> hapi.EventsSigned: ...


class _Answer(Exception):
    """Settled while building: this is the answer, nothing to apply."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _KeptAnswer(Exception):
    """A resend of the request that wrote the current entry: open its kept answer."""


class _Refuse(Exception):
    """No live record: answer with the fleet-signed refusal."""


@dataclass(frozen=True)
class _Writes:
    """A client request: its id and fingerprint (``bkv_protocol.transcripts``),
    and its route and fields, from which the boundary computes the
    fingerprint a refusal of it is signed over."""

    user_id: str
    request_id: bytes
    fingerprint: bytes
    out_type: type[BaseModel]
    fleet_id: str | None
    route: transcripts.Route
    fields: tuple[bytes, ...] = ()
    legacy: bool = False  # a client built before per-state refusals: sign its refusal per request

    @classmethod
    def of(cls, op: ops.Operation, req) -> _Writes:
        """A client operation's request (``bkv_protocol.operations``)."""
        return cls(req.user_id, req.request_id, op.request_fingerprint(req), op.answer, req.fleet_id, op.route,
                   op.request_fields(req), req.legacy)


@dataclass(frozen=True)
class _Op:
    """One state-changing operation."""

    kind: hapi.OpKind
    ref: str
    body: Callable[[hapi.Entry], BaseModel]                   # the hsm-proxy's request, from the current entry
    answer: Callable[[hapi.Entry, bytes | None], Any]         # the island's answer, from the committed entry
    writes: _Writes | None = None                             # a client request; None: admin paths
    settle: Callable[[hapi.Entry], None] | None = None        # raises _Answer or _Refuse, or returns: go on
    counts: Callable[[hapi.Entry], tuple[Counter, ...]] = lambda _e: ()


class Island:
    def __init__(self, island_id: str, ledger: Ledger, hsm: HsmPort, *,
                 islands: Callable[[str], Awaitable[ServiceClient]] | None = None) -> None:
        self.island_id = island_id
        self._ledger = ledger
        self._hsm = hsm
        self._islands = islands  # another island's replicas (moves)
        self._answers: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()  # request id -> (kept reply, answer)
        self._running: dict[str, tuple[bytes, asyncio.Future]] = {}  # request id -> (fingerprint, outcome)
        # (user ref, fleet, state, version) -> the boundary's signed refusal of a tombstone
        self._refusals: OrderedDict[tuple, hapi.RefusalOut] = OrderedDict()

    # -- the one loop --------------------------------------------------------------
    async def _change(self, op: _Op):
        """Run ``op``; a resend of a client request this replica is still
        working on joins it instead of queueing again (on a slow log, resends
        that each queued anew would grow the queue faster than it drains)."""
        if op.writes is None:
            return await self._run(op)
        rid = op.writes.request_id.hex()
        if (running := self._running.get(rid)) is not None:
            fingerprint, outcome = running
            if fingerprint != op.writes.fingerprint:
                raise errors.RequestIdReused("this request id was used for another request; nothing was done")
            metrics.RESENDS_JOINED.inc()
            return await asyncio.shield(outcome)
        outcome = asyncio.get_running_loop().create_future()
        self._running[rid] = (op.writes.fingerprint, outcome)
        try:
            result = await self._run(op)
        except asyncio.CancelledError:
            outcome.cancel()
            raise
        except BaseException as exc:
            outcome.set_exception(exc)
            outcome.exception()  # retrieved: no joiner is required to have waited on it
            raise
        else:
            outcome.set_result(result)
            return result
        finally:
            del self._running[rid]

    async def _run(self, op: _Op):
        await self._ledger.ready()
        try:
            entry, answer = await self._ledger.change(op.ref, lambda current, proof: self._build(op, current, proof))
        except _Answer as done:
            return done.value
        except _KeptAnswer:
            return await self._kept_answer(op)
        except _Refuse:
            return await self._refuse(op)
        if op.writes is not None and entry.request is not None and answer is not None:
            self._answers[op.writes.request_id.hex()] = (entry.request.reply, answer)
            if len(self._answers) > REMEMBERED_ANSWERS:
                self._answers.popitem(last=False)
        for counter in op.counts(entry):
            counter.inc()
        return op.answer(entry, answer)

    def _build(self, op: _Op, current: hapi.Entry, proof: bytes) -> hapi.Op:
        if op.writes is not None:
            self._answered(op.writes, current)
        if op.settle is not None:
            op.settle(current)
        if current.state is hapi.EntryState.MOVED and op.kind is not hapi.OpKind.MOVE_IN:
            raise errors.Moved("the record moved to another island; try again")
        return hapi.Op(kind=op.kind, proof=proof, **{op.kind.value: op.body(current)})

    def _answered(self, writes: _Writes, current: hapi.Entry) -> None:
        """Raise if ``current`` already answers this request (or refuses it)."""
        rid = writes.request_id.hex()
        if current.request is not None and current.request.id == rid:
            if current.request.fingerprint != writes.fingerprint.hex():
                raise errors.RequestIdReused("this request id was used for another request; nothing was done")
            raise _KeptAnswer()
        if rid in current.recent:
            raise errors.RequestSuperseded("this request was answered before and a later change has landed since; "
                                           "nothing was done: start the operation again")

    async def _against_newest(self, ref: str, still: Callable[[hapi.Entry], bool],
                              call: Callable[[hapi.Entry, hapi.Proven], Awaitable[Any]], not_yet: str):
        """``call(current, proven)`` against the newest log this replica can
        read, while ``still(current)`` holds; tried again (three times in all)
        when the log moved on between the proof and the boundary's check.
        Returns ``(current, result)``, or None when the record changed
        meanwhile (decide again). A change not yet captured by a quorum:
        UpstreamUnavailable(``not_yet``); another refusal: raised as it is."""
        for attempt in range(3):
            await self._ledger.sync()
            current, proven = self._ledger.current(ref), self._ledger.proven(ref)
            if not still(current):
                return None
            try:
                return current, await call(current, proven)
            except UpstreamError as exc:
                code = exc.body.error.code
                if attempt < 2 and code in (C.NO_QUORUM, C.STALE_HEAD, C.PROOF_REFUSED):
                    continue
                if code is C.NO_QUORUM:
                    raise UpstreamUnavailable(not_yet) from exc
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _kept_answer(self, op: _Op):
        """A resend of the request that wrote the newest entry: from memory if
        this replica committed it, else the boundary opens the answer kept in
        the entry, once it sees that entry committed."""
        writes, rid = op.writes, op.writes.request_id.hex()

        async def kept(current: hapi.Entry, proven: hapi.Proven) -> bytes:
            mine = self._answers.get(rid)
            if mine is not None and mine[0] == current.request.reply:  # this replica's own commit
                return mine[1]
            return (await self._hsm.open_reply(hapi.ReplyOpenIn(
                user_id=writes.user_id, island=self.island_id, current=current, proven=proven,
                statements=await self._ledger.statements_for(proven.head), request_id=writes.request_id,
                fingerprint=writes.fingerprint))).reply

        try:
            got = await self._against_newest(
                op.ref, lambda current: current.request is not None and current.request.id == rid, kept,
                "too few hsm-proxies hold this change yet; try again shortly")
        except UpstreamError as exc:
            # Sealed by a fleet retired since, or edited in etcd: never evaluate again.
            raise errors.RequestSuperseded("this request was answered before, and that answer can no longer "
                                           "be given; nothing was done: start the operation again") from exc
        if got is None:
            return await self._run(op)  # a later change landed: decide again (superseded)
        metrics.RESENDS_ANSWERED.inc()
        return writes.out_type.model_validate_json(got[1])

    async def _refuse(self, op: _Op):
        """No live record (the log says so): raise the fleet-signed refusal of
        the record's state, signed once per (user, island, version) by the
        boundary, which keeps it (no new signature for a flood). A destroyed
        record's is kept here too: a flood at a dead account is served from
        memory, with no hsm-proxy call, for as long as this island's log shows
        that very tombstone. An absent one is asked of the boundary each time,
        since only its island set says that absent here means absent
        everywhere (docs/protocol.md, "Refusals")."""
        writes = op.writes
        current = self._ledger.current(op.ref)  # what the op was just built against
        key = (op.ref, writes.fleet_id, current.state, current.version)
        out = None if writes.legacy else self._refusals.get(key)
        if out is not None:
            self._refusals.move_to_end(key)
            metrics.child(metrics.STATE_ANSWERS, "remembered").inc()
        else:
            async def refusal(current: hapi.Entry, proven: hapi.Proven) -> hapi.RefusalOut:
                # A client built before per-state refusals checks only the per-request form:
                # a new signature for each of its requests (never kept: it is bound to one).
                per_request = dict(route=writes.route.value, request_id=writes.request_id,
                                   fields=list(writes.fields)) if writes.legacy else {}
                return await self._hsm.refusal(hapi.RefusalIn(
                    user_id=writes.user_id, island=self.island_id, fleet_id=writes.fleet_id, current=current,
                    proven=proven, statements=await self._ledger.statements_for(proven.head), **per_request))

            got = await self._against_newest(
                op.ref, lambda current: current.state in (hapi.EntryState.ABSENT, hapi.EntryState.DESTROYED),
                refusal, "too few hsm-proxies hold the newest state yet; try again shortly")
            if got is None:
                return await self._run(op)  # it moved on meanwhile: decide again
            current, out = got
            if current.state is hapi.EntryState.DESTROYED and not writes.legacy:
                self._refusals[(op.ref, writes.fleet_id, current.state, current.version)] = out
                if len(self._refusals) > REMEMBERED_REFUSALS:
                    self._refusals.popitem(last=False)
        if current.state is hapi.EntryState.ABSENT:
            raise errors.NoRecord("no record for this user", out.signature, out.state)
        metrics.LOCKOUT_HITS.inc()
        raise errors.RecordDestroyed("this record was destroyed after too many wrong passwords, or disabled",
                                     out.signature, out.state)

    # -- registration --------------------------------------------------------------
    async def registration_start(self, req: api.RegistrationStartIn) -> api.RegistrationStartOut:
        # Changes nothing. The challenge is bound to the version: read the newest.
        await self._ledger.ready()
        await self._ledger.sync()
        current = self._ledger.current(user_ref(req.user_id))
        if current.state is hapi.EntryState.MOVED:
            raise errors.Moved("the record moved to another island; try again")
        return await self._hsm.registration_start(ops.REGISTRATION_START.to_hsm(req, self.island_id, current))

    def _client_op(self, op: ops.Operation, req, settle=None, counts=lambda _e: ()) -> _Op:
        """A client operation that writes: the hsm-proxy gets the same body
        with the island and the entry read; the answer is the one committed."""
        return _Op(op.op_kind, user_ref(req.user_id), lambda current: op.to_hsm(req, self.island_id, current),
                   lambda _e, answer: op.answer.model_validate_json(answer), _Writes.of(op, req), settle, counts)

    async def registration_finish(self, req: api.RegistrationFinishIn) -> api.RegistrationFinishOut:
        return await self._change(self._client_op(ops.REGISTRATION_FINISH, req,
                                                  counts=lambda _e: (metrics.REGISTRATIONS,)))

    # -- recover ---------------------------------------------------------------------
    async def recover_start(self, req: api.RecoverStartIn) -> api.RecoverStartOut:
        def settle(current: hapi.Entry) -> None:
            if current.state in (hapi.EntryState.ABSENT, hapi.EntryState.DESTROYED):
                raise _Refuse()

        def counts(entry: hapi.Entry) -> tuple[Counter, ...]:
            # The decrement was captured by a quorum before the response left (invariant 3).
            return (metrics.RECOVER_ATTEMPTS_SPENT,) + (
                (metrics.RECORDS_DESTROYED,) if entry.state is hapi.EntryState.DESTROYED else ())

        return await self._change(self._client_op(ops.RECOVER_START, req, settle, counts))

    async def recover_finish(self, req: api.RecoverFinishIn) -> api.RecoverFinishOut:
        def settle(current: hapi.Entry) -> None:
            # (A destroyed entry still finishes: the guess that used the last attempt may be right.)
            if current.state is hapi.EntryState.ABSENT:
                raise _Refuse()

        return await self._change(self._client_op(ops.RECOVER_FINISH, req, settle,
                                                  lambda _e: (metrics.RECOVERIES_SUCCEEDED,)))

    # -- deletion -------------------------------------------------------------------------
    async def delete(self, req: api.DeleteIn) -> api.DeleteOut:
        """A device deletes its escrow with proof of its password (the HSM
        checks the change ticket); no live record: the signed refusal."""

        def settle(current: hapi.Entry) -> None:
            if current.state in (hapi.EntryState.ABSENT, hapi.EntryState.DESTROYED):
                raise _Refuse()

        return await self._change(self._client_op(ops.DELETE, req, settle))

    # -- the account's event feed ---------------------------------------------------------
    async def events(self, req: api.EventsIn) -> api.EventsOut:
        """The account's stored events and the boundary's signature over its
        committed version and event chain head, for the device's nonce. The
        device checks that the events chain to that head: an event dropped
        or altered here fails its check, and only the oldest can go unshown."""
        await self._ledger.ready()
        ref = user_ref(req.user_id)

        async def signed(current: hapi.Entry, proven: hapi.Proven):
            stored = await self._ledger.events(ref, current.version)
            out = await self._hsm.events(hapi.EventsReadIn(
                read=ops.EVENTS.to_hsm(req, self.island_id, current), proven=proven,
                statements=await self._ledger.statements_for(proven.head)))
            return stored, out

        got = await self._against_newest(ref, lambda current: current.state is not hapi.EntryState.MOVED, signed,
                                         "too few hsm-proxies hold the newest state yet; try again shortly")
        if got is None:
            raise errors.Moved("the record moved to another island; try again")
        _, (stored, out) = got
        metrics.ACCOUNT_EVENT_READS.inc()
        return api.EventsOut(events=[s.event for s in stored], before=stored[0].before if stored else out.head,
                             version=out.version, head=out.head, signature=out.signature)

    # -- rotation and moves -----------------------------------------------------------------
    # No request id: each is idempotent, so a lost answer is settled by running it again.

    async def migrate(self, req: api.MigrateIn) -> api.MigrateOut:
        """Re-seal one record under another fleet: a guess racing with it is
        in the same batch or the next, like any other change."""

        def settle(current: hapi.Entry) -> None:
            if current.state is not hapi.EntryState.LIVE or current.fleet_id == req.to_fleet:
                raise _Answer(api.MigrateOut(migrated=False))

        return await self._change(_Op(
            hapi.OpKind.MIGRATE, req.user_ref,
            lambda current: hapi.MigrateIn(user_ref=req.user_ref, island=self.island_id, current=current,
                                           to_fleet=req.to_fleet),
            lambda _e, _a: api.MigrateOut(migrated=True), settle=settle))

    async def move(self, req: api.MoveIn) -> api.MoveOut:
        """Move a record to ``to_island`` in two committed steps: here it
        becomes MOVED (sealed for its destination, attempts intact); there it
        arrives from that committed entry (:meth:`move_in`). Interrupted
        between the two, the record waits here as MOVED and running the move
        again finishes it; it is never live in two places."""
        await self._ledger.ready()
        await self._ledger.sync()
        current = self._ledger.current(req.user_ref)
        if current.state is hapi.EntryState.ABSENT:
            return api.MoveOut(moved=False)
        if current.state is not hapi.EntryState.MOVED:
            await self._change(_Op(
                hapi.OpKind.MOVE_OUT, req.user_ref,
                lambda cur: hapi.MoveOutIn(user_ref=req.user_ref, island=self.island_id, current=cur,
                                           to_island=req.to_island),
                lambda _e, _a: None))
            current = self._ledger.current(req.user_ref)
        if current.moved_to is None or self._islands is None:
            raise errors.IslandError("a MOVED entry without a destination, or no way to reach it")
        proven = self._ledger.proven(req.user_ref)
        statements = await self._ledger.statements_for(proven.head)
        client = await self._islands(current.moved_to)
        await client.call("POST", "/island/v1/admin/move-in", api.MoveInIn(
            user_ref=req.user_ref, moved=current, from_head=proven.head, from_statements=statements,
            from_proof=proven.proof, events=await self._ledger.events(req.user_ref, current.version)),
            api.MoveOut, idempotent=True)
        await self._ledger.drop_events(req.user_ref)  # the new island keeps the account's feed now
        return api.MoveOut(moved=True)

    async def move_in(self, req: api.MoveInIn) -> api.MoveOut:
        def settle(current: hapi.Entry) -> None:
            if current.state is not hapi.EntryState.ABSENT and current.version >= req.moved.version:
                raise _Answer(api.MoveOut(moved=True))  # here already (a move run again)

        out = await self._change(_Op(
            hapi.OpKind.MOVE_IN, req.user_ref,
            lambda current: hapi.MoveInIn(user_ref=req.user_ref, island=self.island_id, current=current,
                                          moved=req.moved, from_head=req.from_head,
                                          from_statements=req.from_statements, from_proof=req.from_proof),
            lambda _e, _a: api.MoveOut(moved=True), settle=settle))
        # The account's feed follows its record, once the record is here (a
        # move run again stores the same events again).
        await self._ledger.keep_carried(req.user_ref, carried(
            req.events, req.moved.events_head, req.moved.version, self._ledger.events_kept))
        return out

    async def list_refs(self, req: api.ListRefsIn) -> api.ListRefsOut:
        await self._ledger.ready()
        await self._ledger.sync()
        return api.ListRefsOut(user_refs=sorted(
            ref for ref, e in self._ledger.records.items()
            if e.state in (hapi.EntryState.LIVE, hapi.EntryState.DESTROYED)))
