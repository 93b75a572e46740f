"""Adding an island, with the two island sets the admin signed for it
(``bkv_protocol.islands.migration``): the first names the islands with the
new one and the old ones as ``previous``, the second the islands alone.

1. every hsm-proxy stores the first set (its token's next one): from then
   on the boundary signs no refusal and makes no new record for a user
   whose home moves, on either island (``wrong_island``), and moves a
   record only to its new home;
2. the etcd map (the routing hint) becomes the first set, ``previous`` too;
3. every record whose user now hashes to another island is moved (re-sealed
   by the hsm-proxy for its new island, version and attempt count intact),
   in passes until one moves nothing (a registration that was on its way
   while the first set was being stored lands in a second pass);
4. every hsm-proxy stores the second set; the etcd map drops ``previous``.

While it runs, frontends that find no record where the new map says (or
are told ``wrong_island``) follow ``previous`` and move that user on demand
(``bkv_frontend.app``), so traffic continues. Re-running after an
interruption resumes the same migration: a set a token holds already is
stored again as a no-op.
"""

from __future__ import annotations

import asyncio

import aetcd

from bkv_server.fleetmap import read_map, read_replicas, rendezvous_ref, set_island_map, store_island_set
from bkv_server.http import ServiceClient
from bkv_protocol import island_api as api
from bkv_protocol import islands as isl

MAX_PASSES = 5


async def _each_ref(islands: list[str], replicas: dict[str, list[str]], fn, concurrency: int) -> tuple[int, int]:
    """Call ``fn(client, island, ref) -> bool`` for every user ref on each
    island, ``concurrency`` at a time; (refs scanned, calls that said True)."""
    scanned = done = 0
    sem = asyncio.Semaphore(concurrency)
    for island in islands:
        client = ServiceClient(f"island-{island}", replicas.get(island, []))
        try:
            refs = (await client.call("POST", "/island/v1/admin/list-refs", api.ListRefsIn(), api.ListRefsOut,
                                      idempotent=True)).user_refs
            scanned += len(refs)

            async def one(ref: str, client=client, island=island) -> bool:
                async with sem:
                    return await fn(client, island, ref)

            done += sum(await asyncio.gather(*(one(r) for r in refs)))
        finally:
            await client.aclose()
    return scanned, done


def check_migration(new_island: str, moving: isl.SignedIslandSet, final: isl.SignedIslandSet) -> None:
    """The two sets are one migration adding ``new_island`` (the hsm-proxies
    check the signatures and that the first is their token's next set)."""
    m, f = moving.set, final.set
    if m.previous is None or new_island not in m.islands or new_island in m.previous \
            or f.previous is not None or f.islands != m.islands or f.epoch != m.epoch + 1:
        raise RuntimeError(f"the island sets are not one migration adding {new_island}: the first names the "
                           "islands with it and the old ones as previous, the second (its epoch + 1) the same "
                           "islands alone (bkv-hsm-proxy sign-islands)")


async def add_island(etcd: aetcd.Client, prefix: str, new_island: str, moving: isl.SignedIslandSet,
                     final: isl.SignedIslandSet, hsm_urls: list[str], *, concurrency: int = 16) -> dict:
    check_migration(new_island, moving, final)
    target, old = list(moving.set.islands), list(moving.set.previous)
    replicas = await read_replicas(etcd, prefix)
    if not replicas.get(new_island):
        raise RuntimeError(f"island {new_island} has no live replica; start it before adding it to the map")
    await store_island_set(hsm_urls, moving.to_json())
    await set_island_map(etcd, prefix, target, previous=old)

    async def move(client: ServiceClient, island: str, ref: str) -> bool:
        home = rendezvous_ref(ref, target)
        if home == island:
            return False
        out = await client.call("POST", "/island/v1/admin/move", api.MoveIn(user_ref=ref, to_island=home),
                                api.MoveOut, idempotent=True)
        return out.moved

    scanned = moved = 0
    for _ in range(MAX_PASSES):
        seen, done = await _each_ref(old, await read_replicas(etcd, prefix), move, concurrency)
        scanned, moved = max(scanned, seen), moved + done
        if not done:
            break
    else:
        raise RuntimeError(f"records were still moving after {MAX_PASSES} passes; run add-island again")
    await store_island_set(hsm_urls, final.to_json())
    await set_island_map(etcd, prefix, target)
    return {"islands": target, "scanned": scanned, "moved": moved, "epoch": final.set.epoch}


async def migrate_fleet(etcd: aetcd.Client, prefix: str, to_fleet: str, *, concurrency: int = 16) -> dict:
    """Rotation: re-seal every record of every island under ``to_fleet``'s
    keys, one compare-and-swap each, attempt counts intact, while traffic
    continues. Idempotent: records already there are skipped."""
    islands, _ = await read_map(etcd, prefix)

    async def migrate(client: ServiceClient, island: str, ref: str) -> bool:
        out = await client.call("POST", "/island/v1/admin/migrate", api.MigrateIn(user_ref=ref, to_fleet=to_fleet),
                                api.MigrateOut, idempotent=True)
        return out.migrated

    scanned, migrated = await _each_ref(islands, await read_replicas(etcd, prefix), migrate, concurrency)
    return {"to_fleet": to_fleet, "scanned": scanned, "migrated": migrated}
