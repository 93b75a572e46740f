"""Wiring of a real island replica: etcd client, hsm-proxy client, the
replica announcement, and their lifetimes."""

from __future__ import annotations

import asyncio

from bkv_server.etcd import make_client
from bkv_server.fleetmap import announce_replica
from bkv_server.rpc import RpcApp
from bkv_island.app import create_app
from bkv_island.core import Island
from bkv_island.hsm_client import HsmHttpClient
from bkv_island.settings import IslandSettings
from bkv_island.store import EtcdRecordStore


def build_app(settings: IslandSettings) -> RpcApp:
    etcd = make_client(settings.etcd_endpoints)
    hsm = HsmHttpClient(settings.hsm_url_list)
    island = Island(settings.island_id, EtcdRecordStore(etcd, settings.etcd_prefix, group_commit=settings.group_commit), hsm)
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []

    async def startup() -> None:
        await etcd.connect()
        tasks.append(asyncio.create_task(announce_replica(
            etcd, settings.etcd_prefix, settings.island_id, settings.replica_id, settings.url, stop)))

    async def shutdown() -> None:
        stop.set()
        await asyncio.gather(*tasks)
        await hsm.aclose()
        await etcd.close()

    return create_app(island, on_startup=startup, on_shutdown=shutdown)
