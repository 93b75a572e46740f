"""Adding an island to a fleet with many registered users, under load:
only the users that now hash to the new island move, with their attempt
counts, and every user still recovers. CI runs it with 2,000 users
(BKV_ADD_ISLAND_USERS); the issue's 10,000 is the same test with
BKV_ADD_ISLAND_USERS=10000 (about 20 minutes on two cores; its last result
is kept in docs/reliability.md)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from bkv_island.store import events_prefix
from bkv_protocol.hsm_api import Entry, EntryState
from bkv_protocol.v1 import EventKind as K

from bkv import errors
from bkv_protocol.encoding import user_ref
from bkv_server.etcd import connect
from bkv_server.fleetmap import rendezvous
from bkv_protocol.secrets import BackupKey
from bkv_dev.fleet import start_fleet
from reliability_report import ROWS
from test_faults import LIMIT, Ledger, add_island, audit, client, load

USERS = int(os.environ.get("BKV_ADD_ISLAND_USERS", "2000"))
CONCURRENCY = 16


@pytest.fixture(scope="module")
def big_fleet(tmp_path_factory):
    f = start_fleet(tmp_path_factory.mktemp("scale"), islands=["island-a"], replicas_per_island=2, hsm_proxies=3)
    yield f
    f.down()


async def in_parallel(items, fn) -> None:
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(x):
        async with sem:
            await fn(x)

    await asyncio.gather(*(one(x) for x in items))


@pytest.mark.timeout(3600)
async def test_adding_an_island_to_many_users_under_load_moves_only_theirs_and_everyone_recovers(big_fleet):
    fleet = big_fleet
    ledger = Ledger()
    stamp = os.urandom(3).hex()
    users = [f"scale-{stamp}-{i}" for i in range(USERS)]

    async def register(u: str) -> None:
        k = BackupKey(os.urandom(32))
        async with client(fleet, u) as c:
            await c.register(k, "pw-" + u)
        ledger.keys[u] = k

    t = time.monotonic()
    await in_parallel(users, register)
    registered_s = time.monotonic() - t
    dented = users[:50]

    async def dent(u: str) -> None:
        async with client(fleet, u) as c:
            for _ in range(2):
                with pytest.raises(errors.WrongPassword):
                    await c.recover("wrong")

    await in_parallel(dented, dent)
    guessers, honest = users[50:54], users[54:56]
    stop = asyncio.Event()
    task = asyncio.create_task(load(fleet, ledger, guessers, honest, stop))
    took = await add_island(fleet, "island-b", timeout_s=1800)
    stop.set()
    await task

    # Exactly one live entry per user, on the island the new map names (the old
    # island keeps a MOVED tombstone pointing there).
    etcd = await connect(fleet.etcd_endpoints)
    try:
        where = {}
        for island in ("island-a", "island-b"):
            prefix = f"/bkv/records/{island}/".encode()
            for kv in await etcd.get_prefix(prefix):
                entry = Entry.model_validate_json(kv.value)
                if entry.state is EntryState.MOVED:
                    assert entry.moved_to != island
                    continue
                where.setdefault(kv.key[len(prefix):].decode(), []).append(island)
    finally:
        await etcd.close()
    moved = [u for u in users if rendezvous(u, ["island-a", "island-b"]) == "island-b"]
    assert 0 < len(moved) < len(users)
    assert all(where.get(user_ref(u)) == [rendezvous(u, ["island-a", "island-b"])] for u in users)

    for u in dented:  # counts moved with the records
        async with client(fleet, u) as c:
            with pytest.raises(errors.WrongPassword) as wrong:
                await c.recover("wrong")
        assert wrong.value.attempts_left == LIMIT - 2 - 1, u
        ledger.told_wrong[u] = ledger.told_wrong.get(u, 0) + 1

    # Each moved account's feed moved with its record: every change, in
    # order, from the registration on the old island to the guess just made
    # on the new one; the old island keeps none of it.
    moved_dented = sorted(set(dented) & set(moved))
    assert moved_dented
    etcd = await connect(fleet.etcd_endpoints)
    try:
        for u in moved_dented:
            async with client(fleet, u) as c:
                feed = await c.events()
            assert feed.complete and [e.version for e in feed.events] == list(range(1, feed.version + 1)), u
            kinds = [e.kind for e in feed.events]
            assert kinds[:3] == [K.REGISTERED, K.ATTEMPT_USED, K.ATTEMPT_USED] and K.MOVED in kinds, u
            assert kinds[-1] is K.ATTEMPT_USED and feed.events[-1].attempts_left == LIMIT - 3, u
            assert list(await etcd.get_prefix(events_prefix("/bkv", "island-a", user_ref(u)))) == [], u
    finally:
        await etcd.close()

    t = time.monotonic()
    lost, worst = await audit(fleet, ledger, guessers)  # every user recovers its own key
    audited_s = time.monotonic() - t
    ROWS.append({"fault": f"island added under load to {USERS:,} users: {len(moved):,} moved "
                          f"(registering took {registered_s:.0f} s, recovering everyone {audited_s:.0f} s)",
                 "ops": ledger.ops + 2 * USERS, "errors": ledger.errors, "lost": lost, "worst": worst,
                 "recovery_s": round(took, 2)})
    assert lost == 0 and worst <= LIMIT
