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

    return RpcApp("hsm-proxy", {
        "/hsm/v1/registration/start": (api.RegistrationStartIn, sync(vault.registration_start)),
        "/hsm/v1/registration/finish": (api.RegistrationFinishIn, sync(vault.registration_finish)),
        "/hsm/v1/login/start": (api.LoginStartIn, sync(vault.login_start)),
        "/hsm/v1/login/finish": (api.LoginFinishIn, sync(vault.login_finish)),
        "/hsm/v1/reseal": (api.ResealIn, sync(vault.reseal)),
        "/hsm/v1/migrate": (api.MigrateIn, sync(vault.migrate)),
        "/hsm/v1/reply/open": (api.ReplyOpenIn, sync(vault.open_reply)),
        "/hsm/v1/refusal": (api.RefusalIn, sync(vault.refusal)),
    }, errors=errors.TABLE, get_routes={"/hsm/v1/fleet": fleet})
