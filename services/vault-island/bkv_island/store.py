"""The record store seam: :class:`RecordStore`, on etcd or in memory.

Each user has one key under the island's prefix,
``<prefix>/records/<island>/<user ref>`` (``bkv_common.encoding.user_ref``: a
hash of the user id), whose value is the
JSON of :class:`bkv_hsm_proxy.api.Entry`. Writes are compare-and-swap on the
key's etcd ``mod_revision`` (0 when absent), so concurrent replicas never
overwrite each other's decrements.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import aetcd

from bkv_common import metrics
from bkv_common.encoding import user_ref
from bkv_common.etcd import RETRYABLE
from bkv_hsm_proxy.api import Entry, EntryState
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


class EtcdRecordStore:
    """With a bounded cache of the entries this replica last saw (sealed, so
    nothing secret): a hit saves the read's round trip; a stale hit only
    makes the swap fail, and the failed transaction returns the current
    entry in the same round trip."""

    def __init__(self, client: aetcd.Client, prefix: str) -> None:
        self._etcd = client
        self._prefix = prefix
        self._cache: OrderedDict[bytes, Stored] = OrderedDict()
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
        key = ref_key(self._prefix, island, ref)
        tx = self._etcd.transactions
        t = time.perf_counter()
        try:
            ok, responses = await self._etcd.transaction(
                compare=[tx.mod(key) == expected_revision],
                success=[tx.put(key, entry.model_dump_json().encode())],
                failure=[tx.get(key)],
            )
        except RETRYABLE as exc:
            # The outcome is unknown; the caller re-reads and the revision tells.
            self._cache.pop(key, None)
            raise errors.StoreUnavailable("etcd unreachable during a write") from exc
        finally:
            metrics.ETCD_TXN.labels("swap").observe(time.perf_counter() - t)
        if ok:
            self._remember(key, Stored(entry, responses[0].response_put.header.revision))
        else:
            metrics.ETCD_CONFLICTS.labels("swap").inc()
            current = responses[0] if responses else []
            if current:
                value, meta = current[0]
                self._remember(key, Stored(Entry.model_validate_json(value), meta.mod_revision))
            else:
                self._remember(key, Stored(ABSENT, 0))
        return ok

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


class InMemoryRecordStoreFake:
    """Unit tests only: the same compare-and-swap semantics in a dict."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], tuple[Entry, int]] = {}
        self._rev = 0

    async def read(self, island: str, ref: str, *, fresh: bool = False) -> Stored:
        entry, rev = self.data.get((island, ref), (ABSENT, 0))
        return Stored(entry, rev)

    def forget(self, island: str, ref: str) -> None:
        pass

    async def list_refs(self, island: str) -> list[str]:
        return [r for (i, r) in self.data if i == island]

    async def swap(self, island: str, ref: str, expected_revision: int, entry: Entry) -> bool:
        if self.data.get((island, ref), (ABSENT, 0))[1] != expected_revision:
            return False
        self._rev += 1
        self.data[(island, ref)] = (entry, self._rev)
        return True

    async def move(self, from_island: str, to_island: str, ref: str, expected_revision: int,
                   entry: Entry) -> bool:
        if self.data.get((from_island, ref), (ABSENT, 0))[1] != expected_revision:
            return False
        if (to_island, ref) in self.data:
            return False
        del self.data[(from_island, ref)]
        self._rev += 1
        self.data[(to_island, ref)] = (entry, self._rev)
        return True
