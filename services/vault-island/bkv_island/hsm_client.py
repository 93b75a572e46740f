"""The island's way to reach the HSM boundary (``bkv_island.core.HsmPort``):
over HTTP. Unit tests of island logic call the HSM in-process instead
(tests/fakes/hsm_port.py)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from bkv_protocol import hsm_api as hapi
from bkv_server.http import ServiceClient, UpstreamError

CATCH_UP_CHUNK = 128  # entries per capture for an hsm-proxy that is behind (CaptureIn allows 256)


Chain = Callable[[int, int], Awaitable[list[hapi.LogEntry]]]


async def capture_caught_up(capture: Callable[[list[hapi.LogEntry]], Awaitable[hapi.CaptureOut]],
                            heads: Callable[[], Awaitable[hapi.LogHeadsOut]],
                            entries: list[hapi.LogEntry], chain: Chain) -> hapi.Statement:
    """One hsm-proxy captures ``entries``; if it is behind (``not_next_entry``),
    it is first given what it missed, from ``chain(after, upto)`` (etcd)."""
    target = entries[-1]
    try:
        return (await capture(entries)).statement
    except UpstreamError as exc:
        if exc.body.error.code.value != "not_next_entry":
            raise
    have = (await heads()).heads.get(target.island)
    missed = await chain(have.index if have is not None else 0, target.index)
    if not missed or missed[-1].mac != target.mac:
        raise LookupError("this hsm-proxy is ahead of, or on another branch than, the log")
    statement = None
    for i in range(0, len(missed), CATCH_UP_CHUNK):
        statement = (await capture(missed[i:i + CATCH_UP_CHUNK])).statement
    return statement


class HsmHttpClient:
    """Every hsm-proxy call is a pure function of its input, so all are retried."""

    def __init__(self, urls: list[str]) -> None:
        self._c = ServiceClient("hsm-proxy", urls)
        # Captures go to every hsm-proxy, each on its own (a quorum must hold the entry).
        self._each = [ServiceClient(f"hsm-proxy-{i}", [u]) for i, u in enumerate(urls)]

    async def aclose(self) -> None:
        await self._c.aclose()
        for c in self._each:
            await c.aclose()

    # -- the log (bkv_island.ledger) -------------------------------------------------
    async def genesis(self, island: str) -> hapi.LogEntry:
        return await self._c.call("POST", "/hsm/v1/log/genesis", hapi.GenesisIn(island=island), hapi.LogEntry,
                                  idempotent=True)

    async def apply(self, req: hapi.ApplyIn) -> hapi.ApplyOut:
        # Retried freely: nothing leaves apply but held answers and a candidate entry.
        return await self._c.call("POST", "/hsm/v1/log/apply", req, hapi.ApplyOut, idempotent=True)

    async def release(self, req: hapi.ReleaseIn) -> hapi.ReleaseOut:
        return await self._c.call("POST", "/hsm/v1/log/release", req, hapi.ReleaseOut, idempotent=True)

    async def commit(self, entries: list[hapi.LogEntry], chain: Chain) -> list[hapi.Statement]:
        """Have every hsm-proxy capture ``entries`` (one that is behind first
        gets what it missed, from ``chain(after, upto)``); the statements of
        those that did. Fewer than a quorum: release will say so."""
        async def one(c: ServiceClient) -> hapi.Statement:
            return await capture_caught_up(
                lambda batch: c.call("POST", "/hsm/v1/log/capture", hapi.CaptureIn(entries=batch), hapi.CaptureOut,
                                     idempotent=True),
                lambda: c.call("GET", "/hsm/v1/log/heads", None, hapi.LogHeadsOut, idempotent=True),
                entries, chain)

        got = await asyncio.gather(*(one(c) for c in self._each), return_exceptions=True)
        return [s for s in got if isinstance(s, hapi.Statement)]

    async def registration_start(self, req: hapi.RegistrationStartIn) -> hapi.RegistrationStartOut:
        return await self._c.call("POST", "/hsm/v1/registration/start", req, hapi.RegistrationStartOut, idempotent=True)

    async def open_reply(self, req: hapi.ReplyOpenIn) -> hapi.ReplyOpenOut:
        return await self._c.call("POST", "/hsm/v1/reply/open", req, hapi.ReplyOpenOut, idempotent=True)

    async def refusal(self, req: hapi.RefusalIn) -> hapi.RefusalOut:
        return await self._c.call("POST", "/hsm/v1/refusal", req, hapi.RefusalOut, idempotent=True)
