"""``HsmPort`` and ``HsmLogPort`` (bkv_island) without HTTP: calls a
``VaultHsm`` in this process, and turns its refusals into the
``UpstreamError`` the island gets over HTTP (the hsm-proxy's TABLE)."""

from __future__ import annotations

from bkv_hsm_proxy import errors
from bkv_hsm_proxy.core import VaultHsm
from bkv_island.hsm_client import capture_caught_up
from bkv_protocol import hsm_api as hapi
from bkv_server.http import UpstreamError


class InProcessHsmFake:
    def __init__(self, vault: VaultHsm) -> None:
        self.vault = vault
        self.refused: dict[str, int] = {}  # error code -> times the boundary refused a call

    async def _call(self, fn, *args):
        try:
            out = fn(*args)
            return await out if hasattr(out, "__await__") else out
        except errors.HsmProxyError as exc:
            status, body = errors.TABLE.answer(exc)
            self.refused[body.error.code.value] = self.refused.get(body.error.code.value, 0) + 1
            raise UpstreamError(status, body) from exc

    async def registration_start(self, req):
        return await self._call(self.vault.registration_start, req)

    async def open_reply(self, req):
        return await self._call(self.vault.open_reply, req)

    async def refusal(self, req):
        return await self._call(self.vault.refusal, req)

    async def genesis(self, island):
        return await self._call(self.vault.genesis, island)

    async def apply(self, req):
        return await self._call(self.vault.apply, req)

    async def release(self, req):
        return await self._call(self.vault.release, req)

    async def commit(self, entries, chain):
        """The one hsm-proxy's statement, caught up as the real client does it."""
        async def heads():
            return self.vault.log_heads()

        return [await capture_caught_up(lambda batch: self._call(self.vault.capture, hapi.CaptureIn(entries=batch)),
                                        heads, entries, chain)]
