"""The island's way to reach the HSM boundary (``bkv_island.core.HsmPort``):
over HTTP. Unit tests of island logic call the HSM in-process instead
(tests/fakes/hsm_port.py)."""

from __future__ import annotations

from bkv_server.http import ServiceClient
from bkv_protocol import hsm_api as hapi


class HsmHttpClient:
    """Every hsm-proxy call is a pure function of its input, so all are retried."""

    def __init__(self, urls: list[str]) -> None:
        self._c = ServiceClient("hsm-proxy", urls)

    async def aclose(self) -> None:
        await self._c.aclose()

    async def registration_start(self, req: hapi.RegistrationStartIn) -> hapi.RegistrationStartOut:
        return await self._c.call("POST", "/hsm/v1/registration/start", req, hapi.RegistrationStartOut, idempotent=True)

    async def registration_finish(self, req: hapi.RegistrationFinishIn) -> hapi.RegistrationFinishOut:
        return await self._c.call("POST", "/hsm/v1/registration/finish", req, hapi.RegistrationFinishOut, idempotent=True)

    async def login_start(self, req: hapi.LoginStartIn) -> hapi.LoginStartOut:
        return await self._c.call("POST", "/hsm/v1/login/start", req, hapi.LoginStartOut, idempotent=True)

    async def login_finish(self, req: hapi.LoginFinishIn) -> hapi.LoginFinishOut:
        return await self._c.call("POST", "/hsm/v1/login/finish", req, hapi.LoginFinishOut, idempotent=True)

    async def reseal(self, req: hapi.ResealIn) -> hapi.ResealOut:
        return await self._c.call("POST", "/hsm/v1/reseal", req, hapi.ResealOut, idempotent=True)

    async def migrate(self, req: hapi.MigrateIn) -> hapi.ResealOut:
        return await self._c.call("POST", "/hsm/v1/migrate", req, hapi.ResealOut, idempotent=True)

    async def open_reply(self, req: hapi.ReplyOpenIn) -> hapi.ReplyOpenOut:
        return await self._c.call("POST", "/hsm/v1/reply/open", req, hapi.ReplyOpenOut, idempotent=True)

    async def refusal(self, req: hapi.RefusalIn) -> hapi.RefusalOut:
        return await self._c.call("POST", "/hsm/v1/refusal", req, hapi.RefusalOut, idempotent=True)
