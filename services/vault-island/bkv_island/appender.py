"""The appender of an island's log: what turns record changes into log
entries (:class:`Appender`: batching, the etcd transaction, capture and
release, compaction), and the lease under which one replica at a time does
it (issue #17, Liveness). The view it appends to is ``bkv_island.ledger``.

Replicas that append at once race for the log head: the loser's batch is
built again, and on slow links two replicas can keep colliding. So a
replica appends while it holds ``<prefix>/log/<island>/appender`` (its
replica id, on a lease of ``ttl_s``), keeps the lease alive while it has
work and for ``linger_s`` after, then revokes it so another replica takes
over at once. A replica that dies or is cut off loses the key when its
lease expires.

Liveness only: safety never rests on the lease (the head's compare-and-swap
and the HSM boundary decide). So a replica that waited ``wait_s`` without
getting it -- a holder that stays busy, etcd unreachable -- appends anyway
(``bkv_log_appender_total{event="went_on"}``): a race costs a rebuilt batch,
never a guess. The frontend sends an island's requests to one preferred
replica (``bkv_frontend/app.py``), so the waits are rare.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import aetcd

from bkv_island import errors
from bkv_island.store import StoredEvent, event_key, events_prefix, ref_key
from bkv_protocol import transcripts
from bkv_protocol import hsm_api as hapi
from bkv_protocol.wire import ErrorBody
from bkv_protocol.wire import ErrorCode as C
from bkv_server import log_keys, metrics
from bkv_server.etcd import RETRYABLE
from bkv_server.http import UpstreamError, UpstreamUnavailable

if TYPE_CHECKING:
    from bkv_island.ledger import HsmLogPort, Ledger

log = logging.getLogger(__name__)

TTL_S = 2
LINGER_S = 0.25
WAIT_S = 3.0
MAX_BATCH = 32          # ops per entry (etcd takes up to 128 operations per transaction)
COMPACT_EVERY = 1024    # entries between two compactions of the island's log in etcd
RETAIN = 100_000        # entries kept behind the head at least (~30 MB): a replica or hsm-proxy
                        # that far behind reads the records whole / is replaced (docs/reliability.md)


class AppenderLease(Protocol):
    """The seam the appender appends through (``Ledger(appender=...)``)."""

    async def acquire(self) -> None:
        """Return once this replica is the island's appender, or after waiting long enough."""

    def idle(self) -> None:
        """The queue drained: keep the lease ``linger_s`` more, then let it go."""

    async def close(self) -> None: ...


class NoLease:
    """Every replica appends when it has work (one replica; unit tests of logic)."""

    async def acquire(self) -> None:
        return None

    def idle(self) -> None:
        return None

    async def close(self) -> None:
        return None


class EtcdAppenderLease:
    def __init__(self, etcd: aetcd.Client, prefix: str, island: str, replica: str, *,
                 ttl_s: int = TTL_S, linger_s: float = LINGER_S, wait_s: float = WAIT_S) -> None:
        self._etcd = etcd
        self.key = f"{prefix}/log/{island}/appender".encode()
        self.replica = replica
        self._ttl_s, self._linger_s, self._wait_s = ttl_s, linger_s, wait_s
        self._lease: aetcd.Lease | None = None
        self._held_until = 0.0   # monotonic time up to which the lease surely lives (we refreshed it)
        self._busy = False       # between acquire and idle
        self._idle_at = 0.0
        self._keeper: asyncio.Task | None = None
        self._kept: aetcd.Lease | None = None  # the lease the keeper refreshes
        for event in ("acquired", "waited", "went_on", "lost", "released"):
            metrics.child(metrics.LOG_APPENDER, event)

    def holds(self) -> bool:
        return self._held_until > time.monotonic()

    async def acquire(self) -> None:
        self._busy = True
        if self.holds():
            return
        deadline, delay, waited = time.monotonic() + self._wait_s, 0.02, False
        while True:
            try:
                if await self._take():
                    metrics.child(metrics.LOG_APPENDER, "acquired").inc()
                    return
            except Exception as exc:  # noqa: BLE001 - etcd unreachable or the lease gone: try again, then go on
                log.debug("appender lease %s: %s", self.key.decode(), exc)
            if time.monotonic() >= deadline:
                metrics.child(metrics.LOG_APPENDER, "went_on").inc()
                return
            if not waited:
                metrics.child(metrics.LOG_APPENDER, "waited").inc()
                waited = True
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.25)

    async def _take(self) -> bool:
        t = time.monotonic()
        try:
            if self._lease is None:
                self._lease = await self._etcd.lease(self._ttl_s)
            tx = self._etcd.transactions
            ok, _ = await self._etcd.transaction(
                compare=[tx.version(self.key) == 0],
                success=[tx.put(self.key, self.replica.encode(), lease=self._lease)], failure=[])
            if not ok:
                got = await self._etcd.get(self.key)
                ok = got is not None and got.value == self.replica.encode() and got.lease == self._lease.id
        except Exception:
            self._lease = None  # perhaps expired: a new one next time
            raise
        if ok:
            self._held_until = t + self._ttl_s * 0.75
            if self._kept is not self._lease:  # one keeper per lease
                self._kept = self._lease
                self._keeper = asyncio.get_running_loop().create_task(self._keep(self._lease))
        return ok

    def idle(self) -> None:
        self._busy, self._idle_at = False, time.monotonic()

    async def _keep(self, lease: aetcd.Lease) -> None:
        """Refresh ``lease`` while busy and ``linger_s`` after, then revoke it."""
        try:
            next_refresh = time.monotonic() + self._ttl_s / 4
            while self._lease is lease:
                now = time.monotonic()
                linger_end = now + self._ttl_s if self._busy else self._idle_at + self._linger_s
                if now >= linger_end:
                    self._lease, self._held_until = None, 0.0
                    return await _revoke(lease)  # another replica takes over now, not after the TTL
                await asyncio.sleep(max(0.0, min(next_refresh, linger_end) - now))
                if time.monotonic() < next_refresh or self._lease is not lease:
                    continue
                t = time.monotonic()
                try:
                    reply = await lease.refresh()
                    alive = reply is not None and reply.TTL > 0
                except RETRYABLE:
                    alive = False
                if not alive:
                    metrics.child(metrics.LOG_APPENDER, "lost").inc()
                    if self._lease is lease:
                        self._held_until, self._lease = 0.0, None
                    return
                if self._lease is lease:
                    self._held_until = t + self._ttl_s * 0.75
                next_refresh = t + self._ttl_s / 4
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the lease expires by itself; only liveness is at stake
            log.exception("appender lease %s", self.key.decode())
            if self._lease is lease:
                self._held_until, self._lease = 0.0, None

    async def close(self) -> None:
        """Let the lease go now (a replica shutting down): another takes over at once."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        lease, self._lease, self._held_until = self._lease, None, 0.0
        if lease is not None:
            await _revoke(lease)


async def _revoke(lease: aetcd.Lease) -> None:
    """Delete the key with its lease; if etcd does not answer, the lease expires anyway."""
    with contextlib.suppress(Exception):
        await lease.revoke()
        metrics.child(metrics.LOG_APPENDER, "released").inc()


# -- the appender ----------------------------------------------------------------------------------
@dataclass
class _Pending:
    ref: str
    build: Callable[[hapi.Entry, bytes], hapi.Op]
    outcome: asyncio.Future = field(repr=False)


class Appender:
    """The one appender loop of a replica: record changes queue, and one task
    at a time takes a batch (distinct records, up to ``max_batch``) and

    1. asks one hsm-proxy to **apply** it against the view's head: the next
       entry, each record's next entry and each answer *held* by the boundary;
    2. **appends** it: one etcd transaction puts the records, the entry and
       the new head iff the head is still the view's (else: catch up, build
       the batch again);
    3. has the hsm-proxies **capture** it (each persists it in its state file;
       one that is behind is first given the entries it missed) and the
       boundary **release** the answers once a quorum captured (with a single
       hsm-proxy, in the capture call itself: ``HsmHttpClient.commit``).

    It appends while it holds the island's appender lease (above), so
    replicas do not race for the head; safety never rests on the lease.
    Nothing the boundary produced leaves before step 3, so a replica that
    dies, a lost race or a lying etcd can waste work but never an extra
    guess. Every ``compact_every`` entries it deletes the log entries nobody
    needs any more (:meth:`compact`).
    """

    def __init__(self, view: Ledger, etcd: aetcd.Client, hsm: HsmLogPort, *, lease: AppenderLease,
                 max_batch: int = MAX_BATCH, deadline_s: float = 30.0, retain: int = RETAIN,
                 compact_every: int = COMPACT_EVERY) -> None:
        self._view = view
        self._etcd = etcd
        self._appender_lease = lease
        self._hsm = hsm
        self._max_batch = max_batch
        self._retain, self._compact_every = retain, compact_every
        self._compaction: asyncio.Task | None = None
        self._deadline_s = deadline_s
        self._queue: list[_Pending] = []
        self._task: asyncio.Task | None = None  # the loop, while there is work
        # Series from the start, so dashboards and the alert see a 0 before the first event.
        metrics.child(metrics.LOG_ENTRIES, view.island)
        metrics.child(metrics.LOG_COMPACTED, view.island)
        metrics.child(metrics.ETCD_CONFLICTS, "log-append")

    async def change(self, ref: str, build: Callable[[hapi.Entry, bytes], hapi.Op]
                     ) -> tuple[hapi.Entry, bytes | None]:
        """Apply one change to record ``ref``: ``build(current entry, proof)``
        makes the op from what the log says is current when its batch goes.
        Returns the committed entry and the released answer (None for an op
        no client waits on); raises the boundary's refusal as UpstreamError."""
        p = _Pending(ref, build, asyncio.get_running_loop().create_future())
        self._queue.append(p)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return await p.outcome

    async def _run(self) -> None:
        batch: list[_Pending] = []
        try:
            while self._queue:
                # One appender per island (liveness only): changes that arrive during the wait join this batch.
                try:
                    await self._appender_lease.acquire()
                except Exception:  # noqa: BLE001 - safety never rests on the lease: append without it
                    log.exception("island %s: the appender lease failed", self._view.island)
                batch, later, refs = [], [], set()
                for p in self._queue:
                    if p.outcome.done():
                        continue
                    if p.ref in refs or len(batch) == self._max_batch:
                        later.append(p)
                    else:
                        batch.append(p)
                        refs.add(p.ref)
                self._queue = later
                if batch:
                    try:
                        async with self._view.lock:
                            await self._append(batch)
                    except Exception as exc:  # noqa: BLE001 - each caller learns why its change did not land
                        for p in batch:
                            _settle(p, exc=exc)
                batch = []
            self._appender_lease.idle()
        finally:
            for p in batch + self._queue:
                _settle(p, exc=errors.StoreUnavailable("the island stopped during a write"))
            self._queue = []
            self._task = None

    async def _append(self, batch: list[_Pending]) -> None:
        v = self._view
        deadline, lost, synced = time.monotonic() + self._deadline_s, 0, False
        while True:
            if v.head is None:
                await v.read_all()
            ops, live, settled = [], [], []
            for p in batch:
                if p.outcome.done():
                    continue
                try:
                    ops.append(p.build(v.current(p.ref), v.trie.prove(bytes.fromhex(p.ref)).to_bytes()))
                    live.append(p)
                except Exception as exc:  # noqa: BLE001 - settled without the boundary (e.g. a resend)
                    settled.append((p, exc))
            if settled and not synced:
                # Settled without the boundary, so nothing checks the view for them: decide on
                # the newest log (another replica may have appended since this one last read).
                synced, seen = True, v.head.mac
                await self._view.catch_up()
                if v.head.mac != seen:
                    continue
            for p, exc in settled:
                _settle(p, exc=exc)
            if not ops:
                return
            try:
                with _step("apply"):
                    out = await self._hsm.apply(hapi.ApplyIn(head=v.head, ops=ops))
            except UpstreamError as exc:
                if exc.body.error.code is C.STALE_HEAD:
                    seen = v.head.mac
                    await self._view.catch_up()  # another replica appended meanwhile...
                    if v.head.mac == seen:  # ... or etcd went back behind the boundary
                        v.diverged("the HSM boundary captured a newer log head than etcd shows")
                    if time.monotonic() < deadline:
                        continue
                raise
            if out.entry is None:
                for p, r in zip(live, out.results):
                    _settle(p, exc=_refusal(r))
                return
            if not await self._put(out, live):
                metrics.child(metrics.RETRIES, "log-append").inc()
                lost += 1
                # Replicas append optimistically: the loser waits a random while so the
                # two do not meet again at once (slow links made them collide for seconds).
                await asyncio.sleep(random.uniform(0, min(0.5, 0.02 * 2 ** lost)))
                await self._view.catch_up()
                if time.monotonic() >= deadline:
                    raise errors.Contended("too many concurrent changes to this island's log; try again")
                continue
            await self._release(out, live)
            return

    async def _put(self, out: hapi.ApplyOut, live: list[_Pending]) -> bool:
        """One transaction: the records, the entry and the head, iff the head is ours."""
        v = self._view
        tx = self._etcd.transactions
        changed = [(p.ref, r.new_entry) for p, r in zip(live, out.results) if r.new_entry is not None]
        entry = out.entry
        puts = [tx.put(ref_key(v.prefix, v.island, ref), e.model_dump_json().encode()) for ref, e in changed]
        puts += self._events(out, live)
        puts.append(tx.put(v.entry_key(entry.index), log_keys.entry_value(entry, [ref for ref, _ in changed])))
        puts.append(tx.put(v.head_key, entry.model_dump_json().encode()))
        t = time.perf_counter()
        metrics.LOG_CHANGES_PER_ENTRY.observe(len(changed))
        try:
            ok, responses = await self._etcd.transaction(
                compare=[tx.mod(v.head_key) == v.head_rev], success=puts, failure=[])
        except RETRYABLE:
            # Unknown outcome: the head says whether it landed.
            await self._sync_settling(entry)
            return v.head is not None and v.head.mac == entry.mac
        finally:
            metrics.child(metrics.ETCD_TXN, "log-append").observe(time.perf_counter() - t)
            metrics.child(metrics.LOG_STEP, "append").observe(time.perf_counter() - t)
        if not ok:
            metrics.child(metrics.ETCD_CONFLICTS, "log-append").inc()
            return False
        v.appended(entry, responses[-1].response_put.header.revision, changed)
        metrics.child(metrics.LOG_ENTRIES, v.island).inc()
        for r in out.results:
            if r.event is not None:
                metrics.child(metrics.ACCOUNT_EVENTS, r.event.kind.value).inc()
        if entry.index % self._compact_every == 0 and (self._compaction is None or self._compaction.done()):
            self._compaction = asyncio.get_running_loop().create_task(self._compact_quietly(entry.index))
        return True

    def _events(self, out: hapi.ApplyOut, live: list[_Pending]) -> list:
        """The transaction's writes of the accounts' events (``bkv_island.store``):
        each change's event beside its entry, and the account's events older
        than the last ``events_kept`` deleted."""
        v, tx, writes = self._view, self._etcd.transactions, []
        for p, r in zip(live, out.results):
            if r.event is None or r.new_entry is None:
                continue
            before = v.current(p.ref).events_head or transcripts.EVENTS_EMPTY
            writes.append(tx.put(event_key(v.prefix, v.island, p.ref, r.event.version),
                                 StoredEvent(event=r.event, before=before).model_dump_json().encode()))
            oldest = r.event.version - v.events_kept + 1
            if oldest > 1:
                writes.append(tx.delete(events_prefix(v.prefix, v.island, p.ref),
                                        range_end=event_key(v.prefix, v.island, p.ref, oldest)))
        return writes

    async def compact(self, head_index: int) -> int:
        """Delete the log entries nobody needs any more: more than ``retain``
        behind the head and behind every hsm-proxy that answers (one still
        catching up keeps what it needs; one that stays away longer is
        replaced, docs/reliability.md). Records and the head are never
        touched, so safety does not depend on this. Returns the entries deleted."""
        floor = head_index - self._retain
        if floor <= 1:
            return 0
        lowest = await self._hsm.lowest_head(self._view.island)
        if lowest is None:
            return 0  # no hsm-proxy answered: maybe all are catching up
        floor = min(floor, lowest)
        try:
            deleted = (await self._etcd.delete_range(self._view.entry_key(0), self._view.entry_key(floor))).deleted
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc
        metrics.child(metrics.LOG_COMPACTED, self._view.island).inc(deleted)
        return deleted

    async def _compact_quietly(self, head_index: int) -> None:
        try:
            await self.compact(head_index)
        except Exception:  # noqa: BLE001 - the next compaction tries again; appends never wait for it
            log.warning("island %s: compacting the log failed", self._view.island, exc_info=True)


    async def _sync_settling(self, entry: hapi.LogEntry) -> None:
        deadline = time.monotonic() + self._deadline_s
        while True:
            try:
                return await self._view.catch_up()
            except errors.StoreUnavailable:
                if time.monotonic() >= deadline:
                    raise errors.OutcomeUnknown("etcd lost the answer to a write; this attempt may or may not "
                                                "have been counted") from None
                await asyncio.sleep(0.1)


    async def _release(self, out: hapi.ApplyOut, live: list[_Pending]) -> None:
        held = [r.held for r in out.results if r.held is not None]
        with _step("capture"):
            got = await self._hsm.commit([out.entry], self._view.chain, held)
        self._view.committed(out.entry, got.statements)
        answers = got.answers
        if held and answers is None:  # not released with a capture (several hsm-proxies, or no quorum yet)
            try:
                with _step("release"):
                    answers = (await self._hsm.release(hapi.ReleaseIn(
                        entry=out.entry, statements=got.statements, held=held))).answers
            except UpstreamError as exc:
                if exc.body.error.code is not C.NO_QUORUM:
                    raise
                # Appended but captured by too few hsm-proxies: nothing leaves. A resend
                # is answered from this commit once enough of them capture it.
                raise UpstreamUnavailable("too few hsm-proxies captured the change; try again shortly") from None
        answers = iter(answers or [])
        for p, r in zip(live, out.results):
            if r.error is not None:
                _settle(p, exc=_refusal(r))
            else:
                _settle(p, result=(r.new_entry, next(answers) if r.held is not None else None))

@contextlib.contextmanager
def _step(name: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        metrics.child(metrics.LOG_STEP, name).observe(time.perf_counter() - t)


def _refusal(r: hapi.OpResult) -> UpstreamError:
    return UpstreamError(r.status, ErrorBody(error=r.error))


def _settle(p: _Pending, *, result=None, exc: BaseException | None = None) -> None:
    if p.outcome.done():
        return
    if exc is not None:
        p.outcome.set_exception(exc)
    else:
        p.outcome.set_result(result)
