"""The record store seam: :class:`RecordStore`, on etcd (unit tests: tests/fakes/store.py).

Each user has one key under the island's prefix,
``<prefix>/records/<island>/<user ref>`` (``bkv_protocol.encoding.user_ref``: a
hash of the user id), whose value is the
JSON of :class:`bkv_protocol.hsm_api.Entry`. Writes are compare-and-swap on the
key's etcd ``mod_revision`` (0 when absent), so concurrent replicas never
overwrite each other's decrements.

Swaps are group-committed: while one transaction is in flight, the swaps
that arrive meanwhile wait and then go together in the next one (each with
its own compare), so under load one etcd round trip and one Raft entry
carry many decrements. Nothing waits for a batch to fill: a lone swap goes
at once. A batch is all-or-nothing in etcd, so when any compare fails the
store answers ``False`` only to the swaps whose record really moved on and
sends the others again -- each caller sees exactly what a transaction of
its own would have told it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import aetcd

from bkv_server import metrics
from bkv_protocol.encoding import user_ref
from bkv_server.etcd import RETRYABLE
from bkv_protocol.hsm_api import Entry, EntryState
from bkv_island import errors


@dataclass(frozen=True)
class Stored:
    entry: Entry
    revision: int  # etcd mod_revision; 0 when the key does not exist
    cached: bool = False  # came from this replica's cache, may be stale


ABSENT = Entry(state=EntryState.ABSENT, version=0)


def ref_key(prefix: str, island: str, ref: str) -> bytes:
    return f"{prefix}/records/{island}/{ref}".encode()


def user_key(prefix: str, island: str, user_id: str) -> bytes:
    return ref_key(prefix, island, user_ref(user_id))


class RecordStore(Protocol):
    async def read(self, island: str, ref: str, *, fresh: bool = False) -> Stored:
        """The entry; from a cache unless ``fresh`` (a cached entry may be stale:
        callers must only act on it through :meth:`swap`)."""

    def forget(self, island: str, ref: str) -> None:
        """Drop any cached entry for this user."""

    async def list_refs(self, island: str) -> list[str]:
        """Every user ref with an entry on ``island`` (for moving records)."""

    async def swap(self, island: str, ref: str, expected_revision: int, entry: Entry) -> bool:
        """Write ``entry`` iff the key is still at ``expected_revision``; on
        failure, the cache learns the current entry."""

    async def move(self, from_island: str, to_island: str, ref: str, expected_revision: int,
                   entry: Entry) -> bool:
        """In one transaction: delete the source key (if unchanged) and write the
        destination key (if absent)."""


CACHE_ENTRIES = 100_000
MAX_BATCH = 64  # swaps per transaction; etcd refuses more than 128 operations (--max-txn-ops)


@dataclass
class _Swap:
    key: bytes
    expected_revision: int
    entry: Entry
    value: bytes
    outcome: asyncio.Future


class EtcdRecordStore:
    """With a bounded cache of the entries this replica last saw (sealed, so
    nothing secret): a hit saves the read's round trip; a stale hit only
    makes the swap fail, and the failed transaction returns the current
    entry in the same round trip."""

    def __init__(self, client: aetcd.Client, prefix: str, *, group_commit: bool = True) -> None:
        self._etcd = client
        self._group_commit = group_commit
        self._prefix = prefix
        self._cache: OrderedDict[bytes, Stored] = OrderedDict()
        self._pending: list[_Swap] = []
        self._committer: asyncio.Task | None = None
        # Export the conflict counters at 0 from the start, so dashboards and
        # alerts see a series before the first race.
        for operation in ("swap", "move"):
            metrics.ETCD_CONFLICTS.labels(operation)

    def _remember(self, key: bytes, stored: Stored) -> None:
        self._cache[key] = Stored(stored.entry, stored.revision, cached=True)
        self._cache.move_to_end(key)
        if len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)

    def forget(self, island: str, ref: str) -> None:
        self._cache.pop(ref_key(self._prefix, island, ref), None)

    async def list_refs(self, island: str) -> list[str]:
        base = ref_key(self._prefix, island, "")
        try:
            return [kv.key[len(base):].decode() for kv in await self._etcd.get_prefix(base, keys_only=True)]
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc

    async def read(self, island: str, ref: str, *, fresh: bool = False) -> Stored:
        key = ref_key(self._prefix, island, ref)
        if not fresh and (hit := self._cache.get(key)) is not None:
            return hit
        t = time.perf_counter()
        try:
            got = await self._etcd.get(ref_key(self._prefix, island, ref))
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc
        finally:
            metrics.ETCD_TXN.labels("read").observe(time.perf_counter() - t)
        stored = Stored(ABSENT, 0) if got is None else Stored(Entry.model_validate_json(got.value), got.mod_revision)
        self._remember(key, stored)
        return stored

    async def swap(self, island: str, ref: str, expected_revision: int, entry: Entry) -> bool:
        op = _Swap(ref_key(self._prefix, island, ref), expected_revision, entry, entry.model_dump_json().encode(),
                   asyncio.get_running_loop().create_future())
        if not self._group_commit:  # one transaction per swap (loadtest/bench_store.py's baseline)
            await self._commit([op])  # settles it: alone, a failed compare can only be its own
            return op.outcome.result()
        self._pending.append(op)
        if self._committer is None:
            # A task of its own: a caller that is cancelled must not strand the others' swaps.
            self._committer = asyncio.get_running_loop().create_task(self._commit_pending())
        return await op.outcome

    async def _commit_pending(self) -> None:
        batch: list[_Swap] = []
        try:
            while self._pending:
                batch, later, keys = [], [], set()
                for op in self._pending:
                    if op.outcome.done():
                        continue  # its caller gave up before it was sent: not written, as before batching
                    # etcd refuses a key twice in one transaction; the second goes next time.
                    if op.key in keys or len(batch) == MAX_BATCH:
                        later.append(op)
                    else:
                        batch.append(op)
                        keys.add(op.key)
                self._pending = later
                if not batch:
                    break  # every caller left gave up
                try:
                    again = await self._commit(batch)
                except Exception as exc:  # noqa: BLE001 - each caller gets what its own transaction would have raised
                    again = []
                    for op in batch:
                        _settle(op, exc=errors.StoreUnavailable(str(exc))
                                if isinstance(exc, errors.StoreUnavailable) else exc)
                if len(again) == len(batch):  # cannot happen (a failed compare settles its swap); never spin
                    for op in again:
                        _settle(op, result=False)
                    again = []
                self._pending[:0] = again
                batch = []
        finally:
            # Cancelled (the island is stopping): nobody is left waiting without an answer.
            for op in batch + self._pending:
                _settle(op, exc=errors.StoreUnavailable("the island stopped during a write"))
            self._pending = []
            self._committer = None

    async def _commit(self, batch: list[_Swap]) -> list[_Swap]:
        """One transaction for ``batch``; settles every swap whose outcome is
        known and returns the ones to send again."""
        tx = self._etcd.transactions
        t = time.perf_counter()
        metrics.ETCD_BATCH.observe(len(batch))
        try:
            ok, responses = await self._etcd.transaction(
                compare=[tx.mod(op.key) == op.expected_revision for op in batch],
                success=[tx.put(op.key, op.value) for op in batch],
                failure=[tx.get(op.key) for op in batch],
            )
        except RETRYABLE as exc:
            # The outcome is unknown; each caller re-reads and its tag tells whether it landed.
            for op in batch:
                self._cache.pop(op.key, None)
            raise errors.StoreUnavailable("etcd unreachable during a write") from exc
        finally:
            metrics.ETCD_TXN.labels("swap").observe(time.perf_counter() - t)
        if ok:
            revision = responses[0].response_put.header.revision  # one transaction, one revision
            for op in batch:
                self._remember(op.key, Stored(op.entry, revision))
                _settle(op, result=True)
            return []
        again = []
        for op, current in zip(batch, responses):
            stored = Stored(Entry.model_validate_json(current[0][0]), current[0][1].mod_revision) if current \
                else Stored(ABSENT, 0)
            if stored.revision == op.expected_revision:
                again.append(op)  # not this one's race: another swap in the batch lost
                continue
            metrics.ETCD_CONFLICTS.labels("swap").inc()
            self._remember(op.key, stored)
            _settle(op, result=False)
        return again

    async def move(self, from_island: str, to_island: str, ref: str, expected_revision: int,
                   entry: Entry) -> bool:
        src = ref_key(self._prefix, from_island, ref)
        dst = ref_key(self._prefix, to_island, ref)
        tx = self._etcd.transactions
        try:
            ok, _ = await self._etcd.transaction(
                compare=[tx.mod(src) == expected_revision, tx.version(dst) == 0],
                success=[tx.delete(src), tx.put(dst, entry.model_dump_json().encode())],
                failure=[],
            )
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable during a move") from exc
        self._cache.pop(src, None)
        if not ok:
            metrics.ETCD_CONFLICTS.labels("move").inc()
        return ok


def _settle(op: _Swap, *, result: bool | None = None, exc: BaseException | None = None) -> None:
    if op.outcome.done():  # settled already, or its caller was cancelled while the write was in flight
        return
    if exc is not None:
        op.outcome.set_exception(exc)
    else:
        op.outcome.set_result(result)

