"""This replica's view of its island's log in etcd (issue #17; the rules are
the boundary's: bkv_hsm_proxy/log.py, docs/protocol.md), and the entry to
the appender that changes it (``bkv_island.appender.Appender``).

The view: the newest log head, every record of the island and the sparse
Merkle trie over them (``bkv_protocol.merkle``), kept equal to what etcd
holds: the log under ``bkv_server.log_keys``, the records under
``bkv_island.store``. It reads the island whole at start-up, catches up
with the entries other replicas appended, proves what a record is against
the head (:meth:`Ledger.proven`), and moves only with a transaction the
appender saw land (:meth:`Ledger.appended`).

Nothing in the view decides anything by itself: the boundary checks every
change against the head. If etcd shows a head older than one seen before,
or records that do not add up to the head's root, the island fails closed
(``LedgerDiverged``): a clear error and the ``bkv_log_diverged_total``
metric, never a reset.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol

import aetcd

from bkv_island import errors
from bkv_island.appender import COMPACT_EVERY, MAX_BATCH, RETAIN, Appender, AppenderLease, NoLease
from bkv_island.hsm_client import Committed
from bkv_island.store import EVENTS_KEPT, StoredEvent, event_key, events_prefix, ref_key
from bkv_protocol import hsm_api as hapi
from bkv_protocol import merkle
from bkv_server import log_keys, metrics
from bkv_server.etcd import RETRYABLE

log = logging.getLogger(__name__)

ABSENT = hapi.Entry(state=hapi.EntryState.ABSENT, version=0)


_digest = hapi.entry_digest  # a record's leaf value: one definition, shared with the boundary


class HsmLogPort(Protocol):
    """The hsm-proxies as the view and the appender need them (bkv_island.hsm_client)."""

    async def genesis(self, island: str) -> hapi.LogEntry: ...
    async def apply(self, req: hapi.ApplyIn) -> hapi.ApplyOut: ...
    async def commit(self, entries: list[hapi.LogEntry], chain: Callable,
                     held: list[bytes] | None = None) -> Committed: ...
    async def release(self, req: hapi.ReleaseIn) -> hapi.ReleaseOut: ...
    async def lowest_head(self, island: str) -> int | None: ...


class Ledger:
    """The view of the island's log; :meth:`change` queues a change on its
    appender (``appender``: the lease it appends under)."""

    def __init__(self, island: str, etcd: aetcd.Client, prefix: str, hsm: HsmLogPort, *,
                 max_batch: int = MAX_BATCH, deadline_s: float = 30.0, appender: AppenderLease | None = None,
                 retain: int = RETAIN, compact_every: int = COMPACT_EVERY, events_kept: int = EVENTS_KEPT) -> None:
        self.island = island
        self.events_kept = events_kept
        self._etcd = etcd
        self._hsm = hsm
        self.head_key = log_keys.head_key(prefix, island)
        self.prefix = prefix
        self._records = ref_key(prefix, island, "")  # every record of the island (bkv_island.store)
        self.head: hapi.LogEntry | None = None
        self.head_rev = 0  # mod_revision of the head key; 0: absent (the genesis head)
        self.trie = merkle.Trie()
        self.records: dict[str, hapi.Entry] = {}
        self.statements: list[hapi.Statement] = []  # a quorum's, for self.head, once known
        self._committed: dict[bytes, list[hapi.Statement]] = {}  # entry mac -> the statements its release got
        self.lock = asyncio.Lock()  # sync and append never interleave
        # Series from the start, so dashboards and the alert see a 0 before the first event.
        metrics.child(metrics.LOG_DIVERGED, island)
        self.appender = Appender(self, etcd, hsm, lease=appender or NoLease(), max_batch=max_batch,
                                 deadline_s=deadline_s, retain=retain, compact_every=compact_every)

    async def change(self, ref: str, build: Callable[[hapi.Entry, bytes], hapi.Op]
                     ) -> tuple[hapi.Entry, bytes | None]:
        """Apply one change to record ``ref`` (``Appender.change``)."""
        return await self.appender.change(ref, build)

    # -- reading etcd ------------------------------------------------------------------------
    def entry_key(self, index: int) -> bytes:
        return log_keys.entry_key(self.prefix, self.island, index)

    async def load(self) -> None:
        """Read the head and every record; refuse a view that does not add up."""
        async with self.lock:
            await self.read_all()

    async def read_all(self) -> None:
        """``load`` with ``lock`` held (the appender holds it)."""
        # Records change only with the head (one transaction): a head that did
        # not move while the records were read makes them one snapshot.
        for _ in range(20):
            try:
                got = await self._etcd.get(self.head_key)
                kvs = await self._etcd.get_prefix(self._records)
                again = await self._etcd.get(self.head_key)
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
            self.diverged(f"the records in etcd do not add up to log head #{head.index}")
        self.head, self.head_rev, self.trie, self.records, self.statements = head, rev, trie, records, []

    def diverged(self, why: str):
        metrics.child(metrics.LOG_DIVERGED, self.island).inc()
        log.error("island %s: %s: failing closed (docs/reliability.md, 'Restoring etcd')", self.island, why)
        raise errors.LedgerDiverged(f"island {self.island}: {why}; the vault fails closed until etcd is restored")

    async def sync(self) -> None:
        """Catch up with what other replicas appended (or learn that etcd went back)."""
        async with self.lock:
            await self.catch_up()

    async def catch_up(self) -> None:
        """``sync`` with ``lock`` held (the appender holds it)."""
        if self.head is None:
            return await self.read_all()
        try:
            got = await self._etcd.get(self.head_key)
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc
        if got is None or got.mod_revision == self.head_rev:
            if got is None and self.head.index > 0:
                self.diverged(f"the log head is gone from etcd (this replica saw #{self.head.index})")
            return
        new = hapi.LogEntry.model_validate_json(got.value)
        if new.index < self.head.index:
            self.diverged(f"etcd's log head #{new.index} is older than #{self.head.index} seen before")
        try:
            entries = await self._etcd.get_range(self.entry_key(self.head.index + 1), self.entry_key(new.index + 1))
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc
        refs = {r for kv in entries for r in log_keys.refs_of(kv.value)}
        if len(entries) != new.index - self.head.index:
            return await self.read_all()  # entries missing: read everything (and check it)
        fetched = []
        for ref in refs:
            try:
                got_rec = await self._etcd.get(ref_key(self.prefix, self.island, ref))
            except RETRYABLE as exc:
                raise errors.StoreUnavailable("etcd unreachable") from exc
            fetched.append((ref, ABSENT if got_rec is None else hapi.Entry.model_validate_json(got_rec.value)))
        # Read first, then adopt with no await until the head moves with them: code that
        # reads the view between its awaits never sees records newer than the head.
        for ref, entry in fetched:
            self._adopt_record(ref, entry)
        if self.trie.root() != new.root:
            return await self.read_all()  # a record moved on again meanwhile, or etcd lies: read it all
        self.head, self.head_rev, self.statements = new, got.mod_revision, []

    def _adopt_record(self, ref: str, entry: hapi.Entry) -> None:
        self.records[ref] = entry
        if (d := _digest(entry)) is not None:
            self.trie.set(bytes.fromhex(ref), d)

    # -- what the appender's writes do to the view ---------------------------------------------
    def appended(self, entry: hapi.LogEntry, rev: int, changed: list[tuple[str, hapi.Entry]]) -> None:
        """The appender's transaction landed at etcd revision ``rev``: the
        records it wrote, and ``entry`` the head."""
        for ref, e in changed:
            self._adopt_record(ref, e)
        self.head, self.head_rev, self.statements = entry, rev, []

    def committed(self, entry: hapi.LogEntry, statements: list[hapi.Statement]) -> None:
        """A quorum's capture statements for ``entry``, the head just appended."""
        self.statements = statements
        # Statements stay valid: kept for a move's evidence or a resend asked about this entry later.
        self._committed[entry.mac] = self.statements
        if len(self._committed) > 1024:
            del self._committed[next(iter(self._committed))]

    # -- what the log says -----------------------------------------------------------------------
    def current(self, ref: str) -> hapi.Entry:
        return self.records.get(ref, ABSENT)

    async def events(self, ref: str, upto: int) -> list[StoredEvent]:
        """The account's stored events up to version ``upto`` (the entry read), oldest first."""
        try:
            kvs = await self._etcd.get_prefix(events_prefix(self.prefix, self.island, ref))
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc
        got = [StoredEvent.model_validate_json(kv.value) for kv in kvs]
        return sorted((e for e in got if e.event.version <= upto), key=lambda e: e.event.version)

    async def keep_carried(self, ref: str, events: list[StoredEvent]) -> None:
        """Store the events a move brought (``store.carried`` chose them).
        Their versions are the record's before it arrived, so they never
        meet one of this island's own events."""
        if not events:
            return
        tx = self._etcd.transactions
        try:
            await self._etcd.transaction(compare=[], success=[
                tx.put(event_key(self.prefix, self.island, ref, e.event.version), e.model_dump_json().encode())
                for e in events], failure=[])
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc

    async def drop_events(self, ref: str) -> None:
        """Forget a moved-away account's events (its new island keeps them)."""
        try:
            await self._etcd.delete_prefix(events_prefix(self.prefix, self.island, ref))
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc

    def proven(self, ref: str) -> hapi.Proven:
        assert self.head is not None
        return hapi.Proven(head=self.head, proof=self.trie.prove(bytes.fromhex(ref)).to_bytes())

    async def ready(self) -> None:
        """Loaded (the first request of a replica reads the whole island)."""
        if self.head is None:
            async with self.lock:
                if self.head is None:
                    await self.read_all()

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
        for s in (await self._hsm.commit([head], self.chain)).statements:  # those that restate it now (a rare path)
            known.setdefault(s.hsm, s)
        return list(known.values())

    async def chain(self, after: int, upto: int) -> list[hapi.LogEntry]:
        """The entries after index ``after`` up to ``upto``, from etcd, for an hsm-proxy that is behind."""
        try:
            got = await self._etcd.get_range(self.entry_key(after + 1), self.entry_key(upto + 1))
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc
        return [log_keys.entry_of(kv.value) for kv in got]

