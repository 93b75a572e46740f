"""The hsm-proxy's HTTP face. Handlers run on the event-loop thread, so
every PKCS#11 call happens on one thread (SoftHSM2 is not safe otherwise)."""

from __future__ import annotations

from bkv_server.rpc import RpcApp
from bkv_protocol import hsm_api as api
from bkv_hsm_proxy import errors
from bkv_hsm_proxy.core import VaultHsm


def create_app(vault: VaultHsm) -> RpcApp:
    def sync(fn):
        async def handler(req):
            return fn(req)

        return handler

    async def fleet() -> api.FleetParams:
        return vault.params()

    async def heads() -> api.LogHeadsOut:
        return vault.log_heads()

    async def island_set() -> api.IslandSetOut:
        return vault.island_set_out()

    async def genesis(req: api.GenesisIn) -> api.LogEntry:
        return vault.genesis(req.island)

    # No route answers a state change in clear: every one goes through the
    # log (apply, capture, release), so nothing a client could use leaves
    # before a quorum of hsm-proxies captured the entry that pays for it.
    return RpcApp("hsm-proxy", {
        "/hsm/v1/registration/start": (api.RegistrationStartIn, sync(vault.registration_start)),
        "/hsm/v1/log/genesis": (api.GenesisIn, genesis),
        "/hsm/v1/log/apply": (api.ApplyIn, sync(vault.apply)),
        "/hsm/v1/log/capture": (api.CaptureIn, vault.capture),
        "/hsm/v1/log/release": (api.ReleaseIn, sync(vault.release)),
        "/hsm/v1/reply/open": (api.ReplyOpenIn, sync(vault.open_reply)),
        "/hsm/v1/refusal": (api.RefusalIn, sync(vault.refusal)),
        "/hsm/v1/events": (api.EventsReadIn, sync(vault.events)),  # signs a committed feed head; reads only
        # Admin: a change of the member set begins (only on the admin key's signed order).
        "/hsm/v1/members/freeze": (api.FreezeIn, vault.freeze),
        # The admin's next island set (bkv_hsm_proxy.islandset): its signature is its authority.
        "/hsm/v1/islands/store": (api.IslandSetIn, sync(vault.store_island_set)),
    }, errors=errors.TABLE, get_routes={"/hsm/v1/fleet": fleet, "/hsm/v1/log/heads": heads,
                                        "/hsm/v1/islands": island_set})
