"""The island's way to reach the HSM boundary (``bkv_island.core.HsmPort``):
over HTTP. Unit tests of island logic call the HSM in-process instead
(tests/fakes/hsm_port.py)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, NamedTuple

from bkv_protocol import hsm_api as hapi
from bkv_protocol.wire import ErrorCode as C
from bkv_server.http import ServiceClient, UpstreamError

# What an hsm-proxy older than release on capture answers to a capture with ``release``.
_RELEASE_REFUSED = "invalid request: check release"

CATCH_UP_CHUNK = 128  # entries per capture for an hsm-proxy that is behind (CaptureIn allows 256)


Chain = Callable[[int, int], Awaitable[list[hapi.LogEntry]]]
Capture = Callable[[list[hapi.LogEntry], hapi.ReleaseAsk | None], Awaitable[hapi.CaptureOut]]


class Committed(NamedTuple):
    statements: list[hapi.Statement]  # of the hsm-proxies that captured the entry
    answers: list[bytes] | None  # released with the capture; None: release in a call of its own


async def capture_caught_up(capture: Capture, heads: Callable[[], Awaitable[hapi.LogHeadsOut]],
                            entries: list[hapi.LogEntry], chain: Chain,
                            release: hapi.ReleaseAsk | None = None) -> hapi.CaptureOut:
    """One hsm-proxy captures ``entries``; if it is behind (``not_next_entry``),
    it is first given what it missed, from ``chain(after, upto)`` (etcd).
    ``release`` (held answers of the last entry) rides only on the capture
    that ends on that entry, never on a chunk of earlier ones."""
    target = entries[-1]
    try:
        return await capture(entries, release)
    except UpstreamError as exc:
        if exc.body.error.code is not C.NOT_NEXT_ENTRY:
            raise
    have = (await heads()).heads.get(target.island)
    missed = await chain(have.index if have is not None else 0, target.index)
    if not missed or missed[-1].mac != target.mac:
        raise LookupError("this hsm-proxy is ahead of, or on another branch than, the log")
    out = None
    for i in range(0, len(missed), CATCH_UP_CHUNK):
        chunk = missed[i:i + CATCH_UP_CHUNK]
        out = await capture(chunk, release if chunk[-1].mac == target.mac else None)
    return out


async def _capture(c: ServiceClient, batch: list[hapi.LogEntry], release: hapi.ReleaseAsk | None) -> hapi.CaptureOut:
    try:
        return await c.call("POST", "/hsm/v1/log/capture", hapi.CaptureIn(entries=batch, release=release),
                            hapi.CaptureOut, idempotent=True)
    except UpstreamError as exc:
        # An hsm-proxy older than release on capture refuses the field (a rolling
        # upgrade, islands first): capture in the old shape, release apart. Its
        # refusal names the field (bkv_server.rpc.validation_message), nothing else does.
        if release is None or exc.body.error.code is not C.INVALID_REQUEST or \
                exc.body.error.message != _RELEASE_REFUSED:
            raise
    return await c.call("POST", "/hsm/v1/log/capture", hapi.CaptureIn(entries=batch), hapi.CaptureOut,
                        idempotent=True)


async def _heads(c: ServiceClient) -> hapi.LogHeadsOut:
    return await c.call("GET", "/hsm/v1/log/heads", None, hapi.LogHeadsOut, idempotent=True)


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

    async def commit(self, entries: list[hapi.LogEntry], chain: Chain, held: list[bytes] | None = None) -> Committed:
        """Have every hsm-proxy capture ``entries`` (one that is behind first
        gets what it missed, from ``chain(after, upto)``); the statements of
        those that did. Fewer than a quorum: release will say so. With a
        single hsm-proxy, ``held`` (the last entry's held answers) rides on
        its capture and comes back released."""
        # Only one hsm-proxy can be a quorum by itself: quorum 1 means a fleet of
        # one (bkv_hsm_proxy.log.quorum), and with several each captures in parallel,
        # knowing no other's statement. So no /heads call to learn the quorum; the
        # boundary decides in any case (no quorum: no answers, release apart).
        ask = hapi.ReleaseAsk(held=held) if held and len(self._each) == 1 else None

        async def one(c: ServiceClient) -> hapi.CaptureOut:
            return await capture_caught_up(lambda batch, release: _capture(c, batch, release),
                                           lambda: _heads(c), entries, chain, ask)

        got = [o for o in await asyncio.gather(*(one(c) for c in self._each), return_exceptions=True)
               if isinstance(o, hapi.CaptureOut)]
        answers = next((o.answers for o in got if o.answers is not None), None)
        return Committed([o.statement for o in got], answers)

    async def lowest_head(self, island: str) -> int | None:
        """The lowest index any hsm-proxy that answers has captured for
        ``island`` (0: one has none yet); None if none answered."""
        got = await asyncio.gather(*(_heads(c) for c in self._each), return_exceptions=True)
        heads = [h.heads[island].index if island in h.heads else 0 for h in got if isinstance(h, hapi.LogHeadsOut)]
        return min(heads) if heads else None

    async def registration_start(self, req: hapi.RegistrationStartIn) -> hapi.RegistrationStartOut:
        return await self._c.call("POST", "/hsm/v1/registration/start", req, hapi.RegistrationStartOut, idempotent=True)

    async def open_reply(self, req: hapi.ReplyOpenIn) -> hapi.ReplyOpenOut:
        return await self._c.call("POST", "/hsm/v1/reply/open", req, hapi.ReplyOpenOut, idempotent=True)

    async def refusal(self, req: hapi.RefusalIn) -> hapi.RefusalOut:
        return await self._c.call("POST", "/hsm/v1/refusal", req, hapi.RefusalOut, idempotent=True)

    async def events(self, req: hapi.EventsReadIn) -> hapi.EventsSigned:
        return await self._c.call("POST", "/hsm/v1/events", req, hapi.EventsSigned, idempotent=True)
