"""Wiring of a real island replica: etcd client, hsm-proxy client, the
replica announcement, and their lifetimes."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI

from bkv_common.etcd import make_client
from bkv_common.fleetmap import announce_replica
from bkv_island.app import create_app
from bkv_island.core import Island
from bkv_island.hsm_client import HsmHttpClient
from bkv_island.settings import IslandSettings
from bkv_island.store import EtcdRecordStore


def build_app(settings: IslandSettings) -> FastAPI:
    etcd = make_client(settings.etcd_endpoints)
    hsm = HsmHttpClient(settings.hsm_url_list)
    island = Island(settings.island_id, EtcdRecordStore(etcd, settings.etcd_prefix), hsm)
    stop = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await etcd.connect()
        task = asyncio.create_task(announce_replica(
            etcd, settings.etcd_prefix, settings.island_id, settings.replica_id, settings.url, stop))
        try:
            yield
        finally:
            stop.set()
            await task
            await hsm.aclose()
            await etcd.close()

    app = create_app(island)
    app.router.lifespan_context = lifespan
    return app
