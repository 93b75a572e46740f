"""``HsmPort`` and ``HsmLogPort`` (bkv_island) without HTTP: calls a
``VaultHsm`` in this process, and turns its refusals into the
``UpstreamError`` the island gets over HTTP (the hsm-proxy's TABLE)."""

from __future__ import annotations

from bkv_hsm_proxy import errors
from bkv_hsm_proxy.core import VaultHsm
from bkv_island.hsm_client import Committed, capture_caught_up
from bkv_protocol import hsm_api as hapi
from bkv_server.http import UpstreamError


class InProcessHsmFake:
    def __init__(self, vault: VaultHsm) -> None:
        self.vault = vault
        self.refused: dict[str, int] = {}  # error code -> times the boundary refused a call
        self.captures_with_release = 0
        self.releases = 0  # calls of release on its own

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

    async def events(self, req):
        return await self._call(self.vault.events, req)

    async def genesis(self, island):
        return await self._call(self.vault.genesis, island)

    async def apply(self, req):
        return await self._call(self.vault.apply, req)

    async def release(self, req):
        self.releases += 1
        return await self._call(self.vault.release, req)

    async def lowest_head(self, island):
        head = self.vault.log_heads().heads.get(island)
        return 0 if head is None else head.index

    async def commit(self, entries, chain, held=None):
        """The one hsm-proxy's statement, caught up as the real client does it;
        ``held`` rides on the capture, as the real client does with one hsm-proxy."""
        async def heads():
            return self.vault.log_heads()

        ask = hapi.ReleaseAsk(held=held) if held else None
        self.captures_with_release += ask is not None
        out = await capture_caught_up(
            lambda batch, release: self._call(self.vault.capture, hapi.CaptureIn(entries=batch, release=release)),
            heads, entries, chain, ask)
        return Committed([out.statement], out.answers)
