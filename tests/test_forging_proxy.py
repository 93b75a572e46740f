"""The forging proxy itself (tests/support/forging_proxy.py), against a small
aiohttp upstream standing in for Envoy: it forwards, forges after
forwarding, drops after forwarding and forges without forwarding exactly
the requests its script names, and records each. No fleet needed; the
end-to-end use is tests/test_forged_answers.py."""

from __future__ import annotations

import json

import httpx
import pytest
from aiohttp import web

from support.forging_proxy import NOISE, Fault, ForgingProxy, no_record, unavailable


@pytest.fixture
async def upstream():
    seen: list[bytes] = []

    async def sealed(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(body=b"sealed answer " + seen[-1], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_post(NOISE, sealed)
    app.router.add_post("/noise/handshake", sealed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_the_proxy_forges_drops_and_forwards_exactly_the_scripted_requests(upstream):
    url, seen = upstream
    with ForgingProxy(url) as proxy:
        proxy.script(Fault("forge", unavailable(), indices={1}), Fault("drop", indices={2}),
                     Fault("forge_only", no_record(), indices={3}))
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            hs = await client.post("/noise/handshake", content=b"hello")
            first = await client.post(NOISE, content=b"r0")
            forged = await client.post(NOISE, content=b"r1")
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(NOISE, content=b"r2")
            alone = await client.post(NOISE, content=b"r3")
            last = await client.post(NOISE, content=b"r4")
        log = proxy.log
    assert hs.status_code == 200 and hs.content == b"sealed answer hello"  # another path: its own count
    assert first.content == b"sealed answer r0" and last.content == b"sealed answer r4"
    assert forged.status_code == 503 and json.loads(forged.content)["error"]["code"] == "unavailable"
    assert alone.status_code == 404 and json.loads(alone.content)["error"]["code"] == "no_record"
    # r1 and r2 reached the upstream before their answers were replaced or cut; r3 never did.
    assert seen == [b"hello", b"r0", b"r1", b"r2", b"r4"]
    assert [(e.path, e.index, e.action, e.upstream_status, e.client_status) for e in log] == [
        ("/noise/handshake", 0, "forwarded", 200, 200), (NOISE, 0, "forwarded", 200, 200),
        (NOISE, 1, "forged", 200, 503), (NOISE, 2, "dropped", 200, None), (NOISE, 3, "forged_only", None, 404),
        (NOISE, 4, "forwarded", 200, 200)]
    assert [e.index for e in proxy.faulted()] == [1, 2, 3]


async def test_a_new_script_counts_requests_from_zero_again(upstream):
    url, _ = upstream
    with ForgingProxy(url) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            await client.post(NOISE, content=b"a")
            proxy.script(Fault("forge", unavailable(), indices={0}))
            assert (await client.post(NOISE, content=b"b")).status_code == 503
            assert (await client.post(NOISE, content=b"c")).status_code == 200
