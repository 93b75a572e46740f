"""This replica's view of its island's log, and the one appender loop that
turns record changes into log entries (issue #17; the rules are the
boundary's: bkv_hsm_proxy/log.py, docs/protocol.md).

The view: the newest log head, every record of the island and the sparse
Merkle trie over them (``bkv_protocol.merkle``), kept equal to what etcd
holds: the log under ``bkv_server.log_keys``, the records under
``bkv_island.store``.

Every change goes through :meth:`Ledger.change`: changes queue, and one
task at a time takes a batch (distinct records, up to ``max_batch``) and

1. asks one hsm-proxy to **apply** it against the head: the next entry, each
   record's next entry and each answer *held* by the boundary;
2. **appends** it: one etcd transaction puts the records, the entry and the
   new head iff the head is still ours (else: catch up, build the batch again);
3. has the hsm-proxies **capture** it (each persists it in its state file;
   one that is behind is first given the entries it missed) and the boundary
   **release** the answers once a quorum captured (with a single hsm-proxy,
   in the capture call itself: ``HsmHttpClient.commit``).

A replica appends while it holds the island's appender lease
(``bkv_island.appender``), so replicas do not race for the head; safety
never rests on the lease. Nothing the boundary produced leaves before
step 3, so a replica that dies, a lost race or a lying etcd can waste work
but never an extra guess. If etcd
shows a head older than the one the boundary captured, or records that do
not add up to the head's root, the island fails closed (``LedgerDiverged``):
a clear error and the ``bkv_log_diverged_total`` metric, never a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import aetcd

from bkv_island import errors
from bkv_island.appender import AppenderLease, NoLease
from bkv_island.hsm_client import Committed
from bkv_island.store import ref_key
from bkv_protocol import hsm_api as hapi
from bkv_protocol import merkle
from bkv_protocol.wire import ErrorBody
from bkv_server import log_keys, metrics
from bkv_server.etcd import RETRYABLE
from bkv_server.http import UpstreamError, UpstreamUnavailable

log = logging.getLogger(__name__)

ABSENT = hapi.Entry(state=hapi.EntryState.ABSENT, version=0)
MAX_BATCH = 32          # ops per entry (etcd takes up to 128 operations per transaction)
COMPACT_EVERY = 1024    # entries between two compactions of the island's log in etcd
RETAIN = 100_000        # entries kept behind the head at least (~30 MB): a replica or hsm-proxy
                        # that far behind reads the records whole / is replaced (docs/reliability.md)


_digest = hapi.entry_digest  # a record's leaf value: one definition, shared with the boundary


class HsmLogPort(Protocol):
    """The hsm-proxies as the appender needs them (bkv_island.hsm_client)."""

    async def genesis(self, island: str) -> hapi.LogEntry: ...
    async def apply(self, req: hapi.ApplyIn) -> hapi.ApplyOut: ...
    async def commit(self, entries: list[hapi.LogEntry], chain: Callable,
                     held: list[bytes] | None = None) -> Committed: ...
    async def release(self, req: hapi.ReleaseIn) -> hapi.ReleaseOut: ...
    async def lowest_head(self, island: str) -> int | None: ...


@dataclass
class _Pending:
    ref: str
    build: Callable[[hapi.Entry, bytes], hapi.Op]
    outcome: asyncio.Future = field(repr=False)


class Ledger:
    def __init__(self, island: str, etcd: aetcd.Client, prefix: str, hsm: HsmLogPort, *,
                 max_batch: int = MAX_BATCH, deadline_s: float = 30.0, appender: AppenderLease | None = None,
                 retain: int = RETAIN, compact_every: int = COMPACT_EVERY) -> None:
        self.island = island
        self._etcd = etcd
        self._appender_lease = appender or NoLease()
        self._hsm = hsm
        self._max_batch = max_batch
        self._retain, self._compact_every = retain, compact_every
        self._compaction: asyncio.Task | None = None
        self._deadline_s = deadline_s
        self._head_key = log_keys.head_key(prefix, island)
        self._prefix = prefix
        self._records = ref_key(prefix, island, "")  # every record of the island (bkv_island.store)
        self.head: hapi.LogEntry | None = None
        self._head_rev = 0  # mod_revision of the head key; 0: absent (the genesis head)
        self.trie = merkle.Trie()
        self.records: dict[str, hapi.Entry] = {}
        self.statements: list[hapi.Statement] = []  # a quorum's, for self.head, once known
        self._committed: dict[bytes, list[hapi.Statement]] = {}  # entry mac -> the statements its release got
        self._queue: list[_Pending] = []
        self._appender: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # sync and append never interleave
        # Series from the start, so dashboards and the alert see a 0 before the first event.
        metrics.child(metrics.LOG_DIVERGED, island)
        metrics.child(metrics.LOG_ENTRIES, island)
        metrics.child(metrics.LOG_COMPACTED, island)
        metrics.child(metrics.ETCD_CONFLICTS, "log-append")

    # -- the view ------------------------------------------------------------------------
    def _entry_key(self, index: int) -> bytes:
        return log_keys.entry_key(self._prefix, self.island, index)

    async def load(self) -> None:
        """Read the head and every record; refuse a view that does not add up."""
        async with self._lock:
            await self._load()

    async def _load(self) -> None:
        # Records change only with the head (one transaction): a head that did
        # not move while the records were read makes them one snapshot.
        for _ in range(20):
            try:
                got = await self._etcd.get(self._head_key)
                kvs = await self._etcd.get_prefix(self._records)
                again = await self._etcd.get(self._head_key)
            except RETRYABLE as exc:
                raise errors.StoreUnavailable("etcd unreachable") from exc
            if (got is None) == (again is None) and (got is None or got.mod_revision == again.mod_revision):
                break
        else:
            raise errors.Contended("the log kept moving while this replica read it; try again")
        if got is None:
            head, rev = await self._hsm.genesis(self.island), 0
        else:
            head, rev = hapi.LogEntry.model_validate_json(got.value), got.mod_revision
        trie, records = merkle.Trie(), {}
        for kv in kvs:
            ref = kv.key[len(self._records):].decode()
            entry = hapi.Entry.model_validate_json(kv.value)
            records[ref] = entry
            if (d := _digest(entry)) is not None:
                trie.set(bytes.fromhex(ref), d)
        if trie.root() != head.root:
            self._diverged(f"the records in etcd do not add up to log head #{head.index}")
        self.head, self._head_rev, self.trie, self.records, self.statements = head, rev, trie, records, []

    def _diverged(self, why: str):
        metrics.child(metrics.LOG_DIVERGED, self.island).inc()
        log.error("island %s: %s: failing closed (docs/reliability.md, 'Restoring etcd')", self.island, why)
        raise errors.LedgerDiverged(f"island {self.island}: {why}; the vault fails closed until etcd is restored")

    async def sync(self) -> None:
        """Catch up with what other replicas appended (or learn that etcd went back)."""
        async with self._lock:
            await self._sync()

    async def _sync(self) -> None:
        if self.head is None:
            return await self._load()
        try:
            got = await self._etcd.get(self._head_key)
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc
        if got is None or got.mod_revision == self._head_rev:
            if got is None and self.head.index > 0:
                self._diverged(f"the log head is gone from etcd (this replica saw #{self.head.index})")
            return
        new = hapi.LogEntry.model_validate_json(got.value)
        if new.index < self.head.index:
            self._diverged(f"etcd's log head #{new.index} is older than #{self.head.index} seen before")
        try:
            entries = await self._etcd.get_range(self._entry_key(self.head.index + 1), self._entry_key(new.index + 1))
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc
        refs = {r for kv in entries for r in log_keys.refs_of(kv.value)}
        if len(entries) != new.index - self.head.index:
            return await self._load()  # entries missing: read everything (and check it)
        fetched = []
        for ref in refs:
            try:
                got_rec = await self._etcd.get(ref_key(self._prefix, self.island, ref))
            except RETRYABLE as exc:
                raise errors.StoreUnavailable("etcd unreachable") from exc
            fetched.append((ref, ABSENT if got_rec is None else hapi.Entry.model_validate_json(got_rec.value)))
        # Read first, then adopt with no await until the head moves with them: code that
        # reads the view between its awaits never sees records newer than the head.
        for ref, entry in fetched:
            self._adopt_record(ref, entry)
        if self.trie.root() != new.root:
            return await self._load()  # a record moved on again meanwhile, or etcd lies: read it all
        self.head, self._head_rev, self.statements = new, got.mod_revision, []

    def _adopt_record(self, ref: str, entry: hapi.Entry) -> None:
        self.records[ref] = entry
        if (d := _digest(entry)) is not None:
            self.trie.set(bytes.fromhex(ref), d)

    def current(self, ref: str) -> hapi.Entry:
        return self.records.get(ref, ABSENT)

    def proven(self, ref: str) -> hapi.Proven:
        assert self.head is not None
        return hapi.Proven(head=self.head, proof=self.trie.prove(bytes.fromhex(ref)).to_bytes())

    async def ready(self) -> None:
        """Loaded (the first request of a replica reads the whole island)."""
        if self.head is None:
            async with self._lock:
                if self.head is None:
                    await self._load()

    async def warm(self, stop: asyncio.Event) -> None:
        """Load at start-up, trying again while etcd or the hsm-proxies are not up yet."""
        while not stop.is_set() and self.head is None:
            try:
                await self.ready()
            except errors.LedgerDiverged:
                return  # said and counted; every request says it again
            except Exception:  # noqa: BLE001 - not up yet: the first request would try anyway
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

    async def statements_for(self, head: hapi.LogEntry) -> list[hapi.Statement]:
        """The hsm-proxies' capture statements for ``head`` (those that hold it
        as their head restate it): what shows the boundary it is committed."""
        known = {s.hsm: s for s in self._committed.get(head.mac, [])}
        for s in (await self._hsm.commit([head], self._chain)).statements:  # those that restate it now (a rare path)
            known.setdefault(s.hsm, s)
        return list(known.values())

    # -- changes -------------------------------------------------------------------------------
    async def change(self, ref: str, build: Callable[[hapi.Entry, bytes], hapi.Op]
                     ) -> tuple[hapi.Entry, bytes | None]:
        """Apply one change to record ``ref``: ``build(current entry, proof)``
        makes the op from what the log says is current when its batch goes.
        Returns the committed entry and the released answer (None for an op
        no client waits on); raises the boundary's refusal as UpstreamError."""
        p = _Pending(ref, build, asyncio.get_running_loop().create_future())
        self._queue.append(p)
        if self._appender is None:
            self._appender = asyncio.get_running_loop().create_task(self._run())
        return await p.outcome

    async def _run(self) -> None:
        batch: list[_Pending] = []
        try:
            while self._queue:
                # One appender per island (liveness only): changes that arrive during the wait join this batch.
                try:
                    await self._appender_lease.acquire()
                except Exception:  # noqa: BLE001 - safety never rests on the lease: append without it
                    log.exception("island %s: the appender lease failed", self.island)
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
                        async with self._lock:
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
            self._appender = None

    async def _append(self, batch: list[_Pending]) -> None:
        deadline, lost, synced = time.monotonic() + self._deadline_s, 0, False
        while True:
            if self.head is None:
                await self._load()
            ops, live, settled = [], [], []
            for p in batch:
                if p.outcome.done():
                    continue
                try:
                    ops.append(p.build(self.current(p.ref), self.trie.prove(bytes.fromhex(p.ref)).to_bytes()))
                    live.append(p)
                except Exception as exc:  # noqa: BLE001 - settled without the boundary (e.g. a resend)
                    settled.append((p, exc))
            if settled and not synced:
                # Settled without the boundary, so nothing checks the view for them: decide on
                # the newest log (another replica may have appended since this one last read).
                synced, seen = True, self.head.mac
                await self._sync()
                if self.head.mac != seen:
                    continue
            for p, exc in settled:
                _settle(p, exc=exc)
            if not ops:
                return
            try:
                with _step("apply"):
                    out = await self._hsm.apply(hapi.ApplyIn(head=self.head, ops=ops))
            except UpstreamError as exc:
                if exc.body.error.code.value == "stale_head":
                    seen = self.head.mac
                    await self._sync()  # another replica appended meanwhile...
                    if self.head.mac == seen:  # ... or etcd went back behind the boundary
                        self._diverged("the HSM boundary captured a newer log head than etcd shows")
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
                await self._sync()
                if time.monotonic() >= deadline:
                    raise errors.Contended("too many concurrent changes to this island's log; try again")
                continue
            await self._release(out, live)
            return

    async def _put(self, out: hapi.ApplyOut, live: list[_Pending]) -> bool:
        """One transaction: the records, the entry and the head, iff the head is ours."""
        tx = self._etcd.transactions
        changed = [(p.ref, r.new_entry) for p, r in zip(live, out.results) if r.new_entry is not None]
        entry = out.entry
        puts = [tx.put(ref_key(self._prefix, self.island, ref), e.model_dump_json().encode()) for ref, e in changed]
        puts.append(tx.put(self._entry_key(entry.index), log_keys.entry_value(entry, [ref for ref, _ in changed])))
        puts.append(tx.put(self._head_key, entry.model_dump_json().encode()))
        t = time.perf_counter()
        metrics.LOG_CHANGES_PER_ENTRY.observe(len(changed))
        try:
            ok, responses = await self._etcd.transaction(
                compare=[tx.mod(self._head_key) == self._head_rev], success=puts, failure=[])
        except RETRYABLE:
            # Unknown outcome: the head says whether it landed.
            await self._sync_settling(entry)
            return self.head is not None and self.head.mac == entry.mac
        finally:
            metrics.child(metrics.ETCD_TXN, "log-append").observe(time.perf_counter() - t)
            metrics.child(metrics.LOG_STEP, "append").observe(time.perf_counter() - t)
        if not ok:
            metrics.child(metrics.ETCD_CONFLICTS, "log-append").inc()
            return False
        for ref, e in changed:
            self._adopt_record(ref, e)
        self.head, self._head_rev, self.statements = entry, responses[-1].response_put.header.revision, []
        metrics.child(metrics.LOG_ENTRIES, self.island).inc()
        if entry.index % self._compact_every == 0 and (self._compaction is None or self._compaction.done()):
            self._compaction = asyncio.get_running_loop().create_task(self._compact_quietly(entry.index))
        return True

    async def compact(self, head_index: int) -> int:
        """Delete the log entries nobody needs any more: more than ``retain``
        behind the head and behind every hsm-proxy that answers (one still
        catching up keeps what it needs; one that stays away longer is
        replaced, docs/reliability.md). Records and the head are never
        touched, so safety does not depend on this. Returns the entries deleted."""
        floor = head_index - self._retain
        if floor <= 1:
            return 0
        lowest = await self._hsm.lowest_head(self.island)
        if lowest is None:
            return 0  # no hsm-proxy answered: maybe all are catching up
        floor = min(floor, lowest)
        try:
            deleted = (await self._etcd.delete_range(self._entry_key(0), self._entry_key(floor))).deleted
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc
        metrics.child(metrics.LOG_COMPACTED, self.island).inc(deleted)
        return deleted

    async def _compact_quietly(self, head_index: int) -> None:
        try:
            await self.compact(head_index)
        except Exception:  # noqa: BLE001 - the next compaction tries again; appends never wait for it
            log.warning("island %s: compacting the log failed", self.island, exc_info=True)

    async def _sync_settling(self, entry: hapi.LogEntry) -> None:
        deadline = time.monotonic() + self._deadline_s
        while True:
            try:
                return await self._sync()
            except errors.StoreUnavailable:
                if time.monotonic() >= deadline:
                    raise errors.OutcomeUnknown("etcd lost the answer to a write; this attempt may or may not "
                                                "have been counted") from None
                await asyncio.sleep(0.1)

    async def _chain(self, after: int, upto: int) -> list[hapi.LogEntry]:
        """The entries after index ``after`` up to ``upto``, from etcd, for an hsm-proxy that is behind."""
        try:
            got = await self._etcd.get_range(self._entry_key(after + 1), self._entry_key(upto + 1))
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc
        return [log_keys.entry_of(kv.value) for kv in got]

    async def _release(self, out: hapi.ApplyOut, live: list[_Pending]) -> None:
        held = [r.held for r in out.results if r.held is not None]
        with _step("capture"):
            got = await self._hsm.commit([out.entry], self._chain, held)
        self.statements = got.statements
        # Statements stay valid: kept for a move's evidence or a resend asked about this entry later.
        self._committed[out.entry.mac] = self.statements
        if len(self._committed) > 1024:
            del self._committed[next(iter(self._committed))]
        answers = got.answers
        if held and answers is None:  # not released with a capture (several hsm-proxies, or no quorum yet)
            try:
                with _step("release"):
                    answers = (await self._hsm.release(hapi.ReleaseIn(
                        entry=out.entry, statements=self.statements, held=held))).answers
            except UpstreamError as exc:
                if exc.body.error.code.value != "no_quorum":
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
