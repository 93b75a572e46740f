"""Wiring of a real island replica: etcd client, hsm-proxy client, the
replica announcement, and their lifetimes."""

from __future__ import annotations

import asyncio

from bkv_server.etcd import make_client
from bkv_server.fleetmap import announce_replica
from bkv_server.ratelimit import Limiter, budgets
from bkv_server.rpc import RpcApp
from bkv_island.app import create_app
from bkv_island.appender import EtcdAppenderLease
from bkv_island.core import Island
from bkv_island.hsm_client import HsmHttpClient
from bkv_island.settings import IslandSettings
from bkv_island.ledger import Ledger
from bkv_server.fleetmap import read_replicas
from bkv_server.http import ServiceClient


def build_app(settings: IslandSettings) -> RpcApp:
    etcd = make_client(settings.etcd_endpoints)
    hsm = HsmHttpClient(settings.hsm_url_list)
    peers: dict[str, ServiceClient] = {}

    async def island_client(island: str) -> ServiceClient:
        """Another island's replicas, from the registry in etcd (moves)."""
        if island not in peers:
            async def urls() -> list[str]:
                return (await read_replicas(etcd, settings.etcd_prefix)).get(island, [])

            peers[island] = ServiceClient(f"island-{island}", await urls())
        return peers[island]

    lease = EtcdAppenderLease(etcd, settings.etcd_prefix, settings.island_id, settings.replica_id)
    ledger = Ledger(settings.island_id, etcd, settings.etcd_prefix, hsm, appender=lease,
                    retain=settings.log_retain_entries, events_kept=settings.events_kept)
    island = Island(settings.island_id, ledger, hsm, islands=island_client)
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []

    async def startup() -> None:
        await etcd.connect()
        tasks.append(asyncio.create_task(ledger.warm(stop)))  # read the island now, not at the first request
        tasks.append(asyncio.create_task(announce_replica(
            etcd, settings.etcd_prefix, settings.island_id, settings.replica_id, settings.url, stop)))

    async def shutdown() -> None:
        stop.set()
        await asyncio.gather(*tasks)
        await lease.close()  # another replica takes over at once, not after the TTL
        await hsm.aclose()
        for c in peers.values():
            await c.aclose()
        await etcd.close()

    limiter = Limiter("account", budgets(settings, "account"))
    return create_app(island, limiter, on_startup=startup, on_shutdown=shutdown)
