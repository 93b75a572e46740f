"""Adding an island: the new map is published with the old one kept as
``previous``, every record whose user now hashes to another island is moved
(re-sealed by the hsm-proxy for its new island and moved in one etcd
transaction, version and attempt count intact), then ``previous`` is dropped.

While it runs, frontends that find no record where the new map says follow
``previous`` and move that user on demand (``bkv_frontend.app``), so traffic
continues. Re-running after an interruption resumes the same migration.
"""

from __future__ import annotations

import asyncio

import aetcd

from bkv_server.fleetmap import read_map, read_replicas, rendezvous_ref, set_island_map
from bkv_server.http import ServiceClient
from bkv_protocol import island_api as api


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


async def add_island(etcd: aetcd.Client, prefix: str, new_island: str, *, concurrency: int = 16) -> dict:
    islands, previous = await read_map(etcd, prefix)
    old = previous if previous is not None else islands
    target = sorted(set(islands) | {new_island})
    replicas = await read_replicas(etcd, prefix)
    if not replicas.get(new_island):
        raise RuntimeError(f"island {new_island} has no live replica; start it before adding it to the map")
    await set_island_map(etcd, prefix, target, previous=old)

    async def move(client: ServiceClient, island: str, ref: str) -> bool:
        home = rendezvous_ref(ref, target)
        if home == island:
            return False
        out = await client.call("POST", "/island/v1/admin/move", api.MoveIn(user_ref=ref, to_island=home),
                                api.MoveOut, idempotent=True)
        return out.moved

    scanned, moved = await _each_ref(old, replicas, move, concurrency)
    await set_island_map(etcd, prefix, target)
    return {"islands": target, "scanned": scanned, "moved": moved}


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
