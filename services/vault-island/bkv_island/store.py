"""The record store seam: :class:`RecordStore`, on etcd or in memory.

Each user has one key under the island's prefix,
``<prefix>/records/<island>/<sha256(label, user id)>``, whose value is the
JSON of :class:`bkv_hsm_proxy.api.Entry`. Writes are compare-and-swap on the
key's etcd ``mod_revision`` (0 when absent), so concurrent replicas never
overwrite each other's decrements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import aetcd

from bkv_common import labels, metrics
from bkv_common.encoding import digest
from bkv_common.etcd import RETRYABLE
from bkv_hsm_proxy.api import Entry, EntryState
from bkv_island import errors


@dataclass(frozen=True)
class Stored:
    entry: Entry
    revision: int  # etcd mod_revision; 0 when the key does not exist


ABSENT = Entry(state=EntryState.ABSENT, version=0)


def user_key(prefix: str, island: str, user_id: str) -> bytes:
    return f"{prefix}/records/{island}/{digest(labels.USER_KEY_HASH, user_id.encode()).hex()}".encode()


class RecordStore(Protocol):
    async def read(self, island: str, user_id: str) -> Stored: ...

    async def swap(self, island: str, user_id: str, expected_revision: int, entry: Entry) -> bool:
        """Write ``entry`` iff the key is still at ``expected_revision``."""

    async def move(self, from_island: str, to_island: str, user_id: str, expected_revision: int,
                   entry: Entry) -> bool:
        """In one transaction: delete the source key (if unchanged) and write the
        destination key (if absent)."""


class EtcdRecordStore:
    def __init__(self, client: aetcd.Client, prefix: str) -> None:
        self._etcd = client
        self._prefix = prefix

    async def read(self, island: str, user_id: str) -> Stored:
        t = time.perf_counter()
        try:
            got = await self._etcd.get(user_key(self._prefix, island, user_id))
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable") from exc
        finally:
            metrics.ETCD_TXN.labels("read").observe(time.perf_counter() - t)
        if got is None:
            return Stored(ABSENT, 0)
        return Stored(Entry.model_validate_json(got.value), got.mod_revision)

    async def swap(self, island: str, user_id: str, expected_revision: int, entry: Entry) -> bool:
        key = user_key(self._prefix, island, user_id)
        tx = self._etcd.transactions
        t = time.perf_counter()
        try:
            ok, _ = await self._etcd.transaction(
                compare=[tx.mod(key) == expected_revision],
                success=[tx.put(key, entry.model_dump_json().encode())],
                failure=[],
            )
        except RETRYABLE as exc:
            # The outcome is unknown; the caller re-reads and the revision tells.
            raise errors.StoreUnavailable("etcd unreachable during a write") from exc
        finally:
            metrics.ETCD_TXN.labels("swap").observe(time.perf_counter() - t)
        if not ok:
            metrics.ETCD_CONFLICTS.labels("swap").inc()
        return ok

    async def move(self, from_island: str, to_island: str, user_id: str, expected_revision: int,
                   entry: Entry) -> bool:
        src = user_key(self._prefix, from_island, user_id)
        dst = user_key(self._prefix, to_island, user_id)
        tx = self._etcd.transactions
        try:
            ok, _ = await self._etcd.transaction(
                compare=[tx.mod(src) == expected_revision, tx.version(dst) == 0],
                success=[tx.delete(src), tx.put(dst, entry.model_dump_json().encode())],
                failure=[],
            )
        except RETRYABLE as exc:
            raise errors.StoreUnavailable("etcd unreachable during a move") from exc
        if not ok:
            metrics.ETCD_CONFLICTS.labels("move").inc()
        return ok


class InMemoryRecordStoreFake:
    """Unit tests only: the same compare-and-swap semantics in a dict."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], tuple[Entry, int]] = {}
        self._rev = 0

    async def read(self, island: str, user_id: str) -> Stored:
        entry, rev = self.data.get((island, user_id), (ABSENT, 0))
        return Stored(entry, rev)

    async def swap(self, island: str, user_id: str, expected_revision: int, entry: Entry) -> bool:
        if self.data.get((island, user_id), (ABSENT, 0))[1] != expected_revision:
            return False
        self._rev += 1
        self.data[(island, user_id)] = (entry, self._rev)
        return True

    async def move(self, from_island: str, to_island: str, user_id: str, expected_revision: int,
                   entry: Entry) -> bool:
        if self.data.get((from_island, user_id), (ABSENT, 0))[1] != expected_revision:
            return False
        if (to_island, user_id) in self.data:
            return False
        del self.data[(from_island, user_id)]
        self._rev += 1
        self.data[(to_island, user_id)] = (entry, self._rev)
        return True
