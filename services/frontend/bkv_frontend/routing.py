"""The frontend's view of the fleet, re-read from etcd in the background:
island map, live replicas per island, and the public fleet parameters.
Users go to islands by :func:`bkv_server.fleetmap.rendezvous`."""

from __future__ import annotations

import asyncio
import json
import logging

import aetcd

from bkv_frontend.errors import NotReady
from bkv_server import metrics
from bkv_server.fleetmap import FLEET_BUNDLE_KEY, FLEET_PARAMS_KEY, read_map, read_replicas, rendezvous
from bkv_server.http import ServiceClient
from bkv_protocol.hsm_api import FleetParams

log = logging.getLogger(__name__)


class FleetView:
    def __init__(self, etcd: aetcd.Client, prefix: str) -> None:
        self._etcd = etcd
        self._prefix = prefix
        self.islands: list[str] = []
        self.previous: list[str] | None = None  # set while records move to a new map
        self.replicas: dict[str, list[str]] = {}
        self.params: dict | None = None
        self.bundle: bytes | None = None  # SignedBundle JSON, passed on as is
        self._clients: dict[str, ServiceClient] = {}

    async def refresh(self) -> None:
        islands, previous = await read_map(self._etcd, self._prefix)
        replicas = await read_replicas(self._etcd, self._prefix)
        got = await self._etcd.get((self._prefix + FLEET_PARAMS_KEY).encode())
        if got is not None:
            params = json.loads(got.value)
            # etcd may lie: parameters that are not a FleetParams are refused here (the
            # last good view stays) rather than failing every GET /v1/fleet with a 500.
            FleetParams.model_validate({k: params[k] for k in FleetParams.model_fields if k in params})
            self.params = params
        got = await self._etcd.get((self._prefix + FLEET_BUNDLE_KEY).encode())
        if got is not None:
            self.bundle = got.value
        self.islands, self.previous, self.replicas = islands, previous, replicas

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep the last good view through etcd hiccups
                log.warning("could not refresh the fleet view from etcd; keeping the last one")
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except asyncio.TimeoutError:
                pass

    def ready(self) -> bool:
        return self.params is not None and bool(self.islands) and all(self.replicas.get(i) for i in self.islands)

    def island_for(self, user_id: str) -> tuple[str, ServiceClient]:
        if not self.islands:
            raise NotReady("the island map is empty")
        island = rendezvous(user_id, self.islands)
        metrics.child(metrics.ISLAND_ROUTING, island).inc()
        return island, self.client(island)

    def previous_island_for(self, user_id: str) -> str | None:
        """Where the user lived before the running migration, if elsewhere."""
        if not self.previous:
            return None
        old = rendezvous(user_id, self.previous)
        return old if old != rendezvous(user_id, self.islands) else None

    def client(self, island: str) -> ServiceClient:
        client = self._clients.get(island)
        if client is None:
            client = ServiceClient(f"island-{island}", lambda i=island: self.replicas.get(i, []), retry_503=False)
            self._clients[island] = client
        return client

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
