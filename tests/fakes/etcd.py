"""The part of ``aetcd.Client`` an island's ledger uses, in a dict, for unit
tests of island logic. It yields to the event loop inside every call, so
concurrent replicas (several ``Ledger``s on one fake) really interleave, and
it counts the transactions whose compare failed (``lost_txns``)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace


class _Compare:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def __eq__(self, revision: int):  # tx.mod(key) == revision, as aetcd spells it
        return ("mod", self.key, revision)


class _Transactions:
    @staticmethod
    def mod(key: bytes) -> _Compare:
        return _Compare(key)

    @staticmethod
    def put(key: bytes, value: bytes):
        return ("put", key, value)

    @staticmethod
    def delete(key: bytes, range_end: bytes | None = None):
        return ("delete", key, range_end)


class InMemoryEtcdFake:
    def __init__(self) -> None:
        self.kv: dict[bytes, tuple[bytes, int]] = {}
        self.revision = 0
        self.lost_txns = 0
        self.transactions = _Transactions()

    def _kv(self, key: bytes):
        value, rev = self.kv[key]
        return SimpleNamespace(key=key, value=value, mod_revision=rev)

    async def get(self, key: bytes):
        await asyncio.sleep(0)
        return self._kv(key) if key in self.kv else None

    async def get_prefix(self, prefix: bytes, **_):
        await asyncio.sleep(0)
        return [self._kv(k) for k in sorted(self.kv) if k.startswith(prefix)]

    async def get_range(self, start: bytes, end: bytes, **_):
        await asyncio.sleep(0)
        return [self._kv(k) for k in sorted(self.kv) if start <= k < end]

    async def delete_range(self, start: bytes, end: bytes, **_):
        await asyncio.sleep(0)
        gone = [k for k in self.kv if start <= k < end]
        for k in gone:
            del self.kv[k]
        self.revision += 1
        return SimpleNamespace(deleted=len(gone))

    async def put(self, key: bytes, value: bytes) -> None:
        self.revision += 1
        self.kv[key] = (value, self.revision)

    async def transaction(self, compare, success, failure):
        await asyncio.sleep(0)
        if not all(self.kv.get(key, (b"", 0))[1] == rev for _, key, rev in compare):
            self.lost_txns += 1
            return False, []
        self.revision += 1
        for op, key, value in success:
            if op == "delete":  # value: the range's end (None: the key alone)
                for k in [k for k in self.kv if k == key or (value is not None and key <= k < value)]:
                    del self.kv[k]
            else:
                self.kv[key] = (value, self.revision)
        header = SimpleNamespace(revision=self.revision)
        return True, [SimpleNamespace(response_put=SimpleNamespace(header=header)) for _ in success]
