"""The island map and the replica registry, both kept in etcd, and the
rendezvous hash that places users on islands.

* ``<prefix>/fleet/islands``: JSON ``{"islands": [ids...]}``, set by an admin
  (``bkv-island set-map``). Changing it moves users: see docs/architecture.md.
  Only a routing hint: which island holds a user is decided by the boundary
  from the admin-signed island set in its token (``bkv_protocol.islands``).
* ``<prefix>/replicas/<island>/<replica>``: the replica's URL, on a lease that
  the replica keeps alive; a dead replica drops out within the lease TTL.
* ``<prefix>/fleet/params``: public fleet parameters from fleet-init.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aetcd

# The placement itself is the protocol's: the boundary computes it from the signed island set.
from bkv_protocol.islands import rendezvous, rendezvous_ref  # noqa: F401 - re-exported
from bkv_protocol import hsm_api
from bkv_server.etcd import RETRYABLE

log = logging.getLogger(__name__)

ISLAND_MAP_KEY = "/fleet/islands"
FLEET_PARAMS_KEY = "/fleet/params"
# The current validation bundle (docs/ota.md), as SignedBundle JSON.
FLEET_BUNDLE_KEY = "/fleet/bundle"
# The bundle being published: stored before the witness sees it, so a failed
# run's bundle is retried byte for byte instead of forked (bkv_hsm_proxy.bundles).
FLEET_PENDING_BUNDLE_KEY = "/fleet/pending-bundle"
REPLICAS_PREFIX = "/replicas/"
REPLICA_TTL_S = 6


async def set_island_map(client: aetcd.Client, prefix: str, islands: list[str],
                         previous: list[str] | None = None) -> None:
    """``previous`` is set while records move to a new map (docs/architecture.md)."""
    value = {"islands": sorted(set(islands))}
    if previous is not None:
        value["previous"] = sorted(set(previous))
    await client.put((prefix + ISLAND_MAP_KEY).encode(), json.dumps(value).encode())


async def set_first_island_map(client: aetcd.Client, prefix: str, islands: list[str]) -> bool:
    """Write the map only if there is none yet (one transaction). An existing
    map changes only through ``add-island``, which moves the records."""
    key = (prefix + ISLAND_MAP_KEY).encode()
    tx = client.transactions
    ok, _ = await client.transaction(compare=[tx.version(key) == 0],
                                     success=[tx.put(key, json.dumps({"islands": sorted(set(islands))}).encode())],
                                     failure=[])
    return ok


async def read_map(client: aetcd.Client, prefix: str) -> tuple[list[str], list[str] | None]:
    """(islands, previous islands while a migration runs, else None)."""
    got = await client.get((prefix + ISLAND_MAP_KEY).encode())
    if not got:
        return [], None
    value = json.loads(got.value)
    return value["islands"], value.get("previous")


async def read_replicas(client: aetcd.Client, prefix: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    base = prefix + REPLICAS_PREFIX
    for kv in await client.get_prefix(base.encode()):
        island = kv.key.decode()[len(base):].split("/", 1)[0]
        out.setdefault(island, []).append(kv.value.decode())
    for urls in out.values():
        urls.sort()
    return out


async def announce_replica(client: aetcd.Client, prefix: str, island: str, replica: str, url: str,
                           stop: asyncio.Event) -> None:
    """Keep ``url`` registered under a lease until ``stop`` is set; re-register
    after etcd outages (the lease may have expired meanwhile)."""
    key = f"{prefix}{REPLICAS_PREFIX}{island}/{replica}".encode()
    lease = None
    while not stop.is_set():
        try:
            if lease is None:
                lease = await client.lease(REPLICA_TTL_S)
                await client.put(key, url.encode(), lease=lease)
            else:
                reply = await lease.refresh()
                if reply is None or reply.TTL <= 0:
                    lease = None
                    continue
        except RETRYABLE:
            lease = None
        except Exception:  # noqa: BLE001 - keep announcing whatever happens
            log.exception("replica announcement failed")
            lease = None
        try:
            await asyncio.wait_for(stop.wait(), REPLICA_TTL_S / 3)
        except asyncio.TimeoutError:
            pass
    if lease is not None:
        try:
            await lease.revoke()
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass


async def store_island_set(hsm_urls: list[str], island_set: str) -> dict[str, hsm_api.IslandSetOut]:
    """Deliver a signed island set (JSON) to every hsm-proxy at ``hsm_urls``,
    which stores it as its token's next set (bkv_hsm_proxy.islandset; the
    admin's signature is its authority). Every one must take it: a token
    left on an older set would still sign refusals the newer one refuses.
    Used by ``bkv-hsm-proxy store-island-set`` and ``bkv-island add-island``."""
    from bkv_server.http import ServiceClient

    if not hsm_urls:
        raise RuntimeError("no hsm-proxy to store the island set in (BKV_ISLAND_HSM_URLS, or --hsm-url)")
    out = {}
    for url in hsm_urls:
        client = ServiceClient("hsm-proxy", [url])
        try:
            out[url] = await client.call("POST", "/hsm/v1/islands/store", hsm_api.IslandSetIn(island_set=island_set),
                                         hsm_api.IslandSetOut, idempotent=True)
        finally:
            await client.aclose()
    return out
