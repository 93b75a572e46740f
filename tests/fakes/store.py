"""``RecordStore`` (bkv_island.store) in a dict, with etcd's compare-and-swap semantics."""

from __future__ import annotations

import asyncio

from bkv_island.store import ABSENT, Stored
from bkv_protocol.hsm_api import Entry


class InMemoryRecordStoreFake:
    """Reads and swaps yield to the event loop (as a round trip to etcd
    would), so concurrent callers really interleave between read and swap;
    ``lost_swaps`` counts the swaps whose compare failed, so a test can show
    that a race did happen."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], tuple[Entry, int]] = {}
        self._rev = 0
        self.lost_swaps = 0

    async def read(self, island: str, ref: str, *, fresh: bool = False) -> Stored:
        entry, rev = self.data.get((island, ref), (ABSENT, 0))
        await asyncio.sleep(0)  # the answer travels back: others run meanwhile
        return Stored(entry, rev)

    def forget(self, island: str, ref: str) -> None:
        pass

    async def list_refs(self, island: str) -> list[str]:
        return [r for (i, r) in self.data if i == island]

    async def swap(self, island: str, ref: str, expected_revision: int, entry: Entry) -> bool:
        await asyncio.sleep(0)  # the request travels: others may write first
        if self.data.get((island, ref), (ABSENT, 0))[1] != expected_revision:
            self.lost_swaps += 1
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
