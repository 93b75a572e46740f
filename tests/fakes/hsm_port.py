"""``HsmPort`` (bkv_island.core) without HTTP: calls a ``VaultHsm`` in this process."""

from __future__ import annotations

from bkv_hsm_proxy.core import VaultHsm


class InProcessHsmFake:
    def __init__(self, vault: VaultHsm) -> None:
        self.vault = vault

    async def registration_start(self, req):
        return self.vault.registration_start(req)

    async def registration_finish(self, req):
        return self.vault.registration_finish(req)

    async def login_start(self, req):
        return self.vault.login_start(req)

    async def login_finish(self, req):
        return self.vault.login_finish(req)

    async def reseal(self, req):
        return self.vault.reseal(req)

    async def migrate(self, req):
        return self.vault.migrate(req)

    async def open_reply(self, req):
        return self.vault.open_reply(req)

    async def refusal(self, req):
        return self.vault.refusal(req)
