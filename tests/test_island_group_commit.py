"""The island's record store on the fleet's real etcd: swaps that arrive while
a transaction is in flight go together in the next one, and each caller
still learns exactly what a transaction of its own would have told it
(bkv_island/store.py). The attempt limit under concurrency, end to end, is
tests/test_vault_concurrency.py."""

from __future__ import annotations

import asyncio
import random

import pytest

from bkv_protocol.hsm_api import Entry, EntryState
from bkv_island import errors
from bkv_island.store import MAX_BATCH, EtcdRecordStore, ref_key


def _entry(version: int) -> Entry:
    return Entry(state=EntryState.LIVE, version=version, sealed="c2VhbGVk", recent=[f"{version:032x}"])


@pytest.fixture
def island() -> str:
    return f"gc-{random.getrandbits(32):08x}"


async def _revisions(etcd, island: str, refs: list[str]) -> list[int]:
    return [(await etcd.get(ref_key("/bkv", island, r))).mod_revision for r in refs]


async def test_concurrent_swaps_of_different_records_commit_in_one_transaction(etcd, island):
    store = EtcdRecordStore(etcd, "/bkv")
    refs = [f"r{i}" for i in range(10)]
    assert await asyncio.gather(*(store.swap(island, r, 0, _entry(1)) for r in refs)) == [True] * 10
    revisions = await _revisions(etcd, island, refs)
    assert len(set(revisions)) == 1  # one transaction: one etcd revision for all ten
    # ... and each caller's cache holds what it wrote, at that revision.
    cached = [await store.read(island, r) for r in refs]
    assert all(c.cached and c.revision == revisions[0] and c.entry.version == 1 for c in cached)


async def test_a_lost_race_in_a_batch_fails_only_its_own_swap(etcd, island):
    store = EtcdRecordStore(etcd, "/bkv")
    assert await store.swap(island, "moved", 0, _entry(1))
    stale = (await store.read(island, "moved")).revision
    other = EtcdRecordStore(etcd, "/bkv")  # another replica moves the record on
    assert await other.swap(island, "moved", stale, _entry(2))

    results = await asyncio.gather(store.swap(island, "moved", stale, _entry(2)),
                                   *(store.swap(island, f"fresh{i}", 0, _entry(1)) for i in range(5)))
    assert results == [False] + [True] * 5
    current = await store.read(island, "moved")  # the failed swap left the current entry in the cache
    assert current.cached and current.entry.version == 2
    assert len(set(await _revisions(etcd, island, [f"fresh{i}" for i in range(5)]))) == 1


async def test_two_swaps_of_one_record_from_one_version_let_exactly_one_win(etcd, island):
    store = EtcdRecordStore(etcd, "/bkv")
    results = await asyncio.gather(*(store.swap(island, "same", 0, _entry(1)) for _ in range(3)),
                                   store.swap(island, "else", 0, _entry(1)))
    assert sorted(results[:3]) == [False, False, True] and results[3] is True
    got = await etcd.get(ref_key("/bkv", island, "same"))
    assert Entry.model_validate_json(got.value).version == 1


async def test_more_swaps_than_one_transaction_takes_all_land(etcd, island):
    store = EtcdRecordStore(etcd, "/bkv")
    refs = [f"many{i}" for i in range(MAX_BATCH + 7)]
    assert all(await asyncio.gather(*(store.swap(island, r, 0, _entry(1)) for r in refs)))
    assert len(set(await _revisions(etcd, island, refs))) == 2  # two transactions, none refused by etcd


class _Gated:
    """The real client, with every transaction held at a gate until released."""

    def __init__(self, client) -> None:
        self._client, self.transactions = client, client.transactions
        self.in_flight, self.release = asyncio.Event(), asyncio.Event()
        self.sent: list[int] = []  # swaps per transaction

    async def transaction(self, **kwargs):
        self.sent.append(len(kwargs["success"]))
        self.in_flight.set()
        await self.release.wait()
        return await self._client.transaction(**kwargs)


async def test_a_swap_whose_caller_gave_up_before_it_was_sent_is_not_written(etcd, island):
    gated = _Gated(etcd)
    store = EtcdRecordStore(gated, "/bkv")
    first = asyncio.ensure_future(store.swap(island, "kept", 0, _entry(1)))
    await gated.in_flight.wait()
    # Run the second swap by hand up to where it waits for its outcome (queued
    # behind the transaction in flight), then give up on it.
    abandoned = store.swap(island, "abandoned", 0, _entry(1))
    outcome = abandoned.send(None)
    outcome.cancel()
    abandoned.close()
    gated.release.set()
    assert await first is True
    assert await store.swap(island, "after", 0, _entry(1))  # the store keeps working
    assert await etcd.get(ref_key("/bkv", island, "abandoned")) is None
    assert await etcd.get(ref_key("/bkv", island, "after")) is not None
    assert gated.sent == [1, 1]  # "kept", then "after": nothing, not even an empty transaction, for the other


async def test_etcd_unreachable_tells_every_caller_in_the_batch_that_the_outcome_is_unknown(island):
    from bkv_server.etcd import connect

    dead = await connect("127.0.0.1:9")  # nothing listens on the discard port
    try:
        store = EtcdRecordStore(dead, "/bkv")
        results = await asyncio.gather(*(store.swap(island, f"x{i}", 0, _entry(1)) for i in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, errors.StoreUnavailable) for r in results)
        assert len({id(r) for r in results}) == 3  # one error each, not one shared object
    finally:
        await dead.close()


async def test_without_group_commit_each_swap_is_its_own_transaction(etcd, island):
    store = EtcdRecordStore(etcd, "/bkv", group_commit=False)
    refs = [f"solo{i}" for i in range(5)]
    assert await asyncio.gather(*(store.swap(island, r, 0, _entry(1)) for r in refs)) == [True] * 5
    assert len(set(await _revisions(etcd, island, refs))) == 5
    assert await store.swap(island, "solo0", 0, _entry(2)) is False  # a lost race, told as before
    assert (await store.read(island, "solo0")).entry.version == 1
