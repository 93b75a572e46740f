"""The lean internal HTTP client (``bkv_server.http``) against real sockets on
loopback: small asyncio servers that answer byte by byte as told, so each
test controls exactly what the wire does (kept-alive connections, a server
closing one, chunked and oversized answers, a caller giving up)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from bkv_protocol.retry import Backoff
from bkv_server import http
from bkv_server.http import ServiceClient, UpstreamError, UpstreamOutcomeUnknown, UpstreamUnavailable


class Echo(BaseModel):
    text: str


def answer(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
            % (status, len(body), extra)) + body


class Server:
    """Reads one request at a time per connection and lets ``reply(request,
    writer)`` answer it (or not); counts connections and requests."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                done = self.reply(request, writer)
                if asyncio.iscoroutine(done):
                    done = await done
                if done is False:
                    writer.close()
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def echo(request: bytes, writer) -> None:
    writer.write(answer(request.partition(b"\r\n\r\n")[2]))


FAST = Backoff(deadline_s=2.0, first_delay_s=0.01)


async def test_requests_reuse_one_kept_alive_connection():
    server = Server(echo)
    async with server as url:
        client = ServiceClient("t", [url], backoff=FAST)
        for i in range(5):
            assert (await client.call("POST", "/x", Echo(text=str(i)), Echo, idempotent=False)).text == str(i)
        await client.aclose()
    assert server.connections == 1 and len(server.requests) == 5
    first = server.requests[0]
    assert first.startswith(b"POST /x HTTP/1.1\r\n") and b"content-type: application/json" in first


async def test_a_refused_replica_fails_over_to_the_next_one():
    server = Server(echo)
    async with server as url:
        # Port 1 on loopback: refused; the request was certainly not processed.
        client = ServiceClient("t", ["http://127.0.0.1:1", url], backoff=FAST)
        assert (await client.call("POST", "/x", Echo(text="a"), Echo, idempotent=False)).text == "a"
        await client.aclose()
    assert len(server.requests) == 1


async def test_a_connection_closed_without_an_answer_is_retried_only_when_idempotent():
    async def drop(request, writer):
        return False  # read the request, close without answering: it may have been processed

    server = Server(drop)
    async with server as url:
        client = ServiceClient("t", [url], backoff=FAST)
        with pytest.raises(UpstreamOutcomeUnknown):
            await client.call("POST", "/x", Echo(text="a"), Echo, idempotent=False)
        assert len(server.requests) == 1  # never sent twice
        with pytest.raises(UpstreamUnavailable):
            await client.call("POST", "/x", Echo(text="a"), Echo, idempotent=True)
        assert len(server.requests) > 2  # retried until the deadline
        await client.aclose()


async def test_an_answer_cut_short_is_an_unknown_outcome():
    async def cut(request, writer):
        writer.write(answer(b'{"text":"a"}')[:-4])
        await writer.drain()
        return False

    async with Server(cut) as url:
        client = ServiceClient("t", [url], backoff=FAST)
        with pytest.raises(UpstreamOutcomeUnknown, match="mid-request"):
            await client.call("POST", "/x", Echo(text="a"), Echo, idempotent=False)
        await client.aclose()


async def test_a_chunked_answer_is_reassembled():
    async def chunked(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"5\r\n{\"tex\r\n7\r\nt\":\"ab\"\r\n1\r\n}\r\n0\r\n\r\n")

    async with Server(chunked) as url:
        client = ServiceClient("t", [url], backoff=FAST)
        assert (await client.call("POST", "/x", Echo(text="a"), Echo, idempotent=False)).text == "ab"
        await client.aclose()


async def test_an_answer_over_the_limit_is_refused(monkeypatch):
    monkeypatch.setattr(http, "MAX_ANSWER_BYTES", 1000)

    async def huge(request, writer):
        writer.write(answer(b'{"text":"' + b"a" * 5000 + b'"}'))

    async with Server(huge) as url:
        client = ServiceClient("t", [url], backoff=FAST)
        with pytest.raises(UpstreamOutcomeUnknown):
            await client.call("POST", "/x", Echo(text="a"), Echo, idempotent=False)
        await client.aclose()


async def test_connection_close_from_the_server_is_honoured():
    server = Server(lambda request, writer: writer.write(answer(b'{"text":"c"}', extra=b"connection: close\r\n")))
    async with server as url:
        client = ServiceClient("t", [url], backoff=FAST)
        for _ in range(3):
            assert (await client.call("GET", "/y", None, Echo, idempotent=True)).text == "c"
        await client.aclose()
    assert server.connections == 3  # a new connection each time, never one the server closed


async def test_a_caller_that_gives_up_never_gets_its_late_answer_delivered_to_the_next():
    release = asyncio.Event()

    async def slow_then_fast(request, writer):
        if b'"slow"' in request:
            await release.wait()
        writer.write(answer(request.partition(b"\r\n\r\n")[2]))

    server = Server(slow_then_fast)
    async with server as url:
        client = ServiceClient("t", [url], backoff=FAST)
        slow = asyncio.create_task(client.call("POST", "/x", Echo(text="slow"), Echo, idempotent=False))
        while not server.requests:
            await asyncio.sleep(0.005)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        release.set()  # the slow answer now arrives, on a connection the client closed
        assert (await client.call("POST", "/x", Echo(text="next"), Echo, idempotent=False)).text == "next"
        await client.aclose()
    assert server.connections == 2


async def test_a_request_past_its_timeout_is_an_unknown_outcome():
    async def never(request, writer):
        await asyncio.Event().wait()

    async with Server(never) as url:
        client = ServiceClient("t", [url], backoff=FAST, timeout_s=0.2)
        with pytest.raises(UpstreamOutcomeUnknown, match="mid-request"):
            await client.call("POST", "/x", Echo(text="a"), Echo, idempotent=False)
        await client.aclose()


async def test_an_error_answer_is_passed_on_with_its_status():
    body = b'{"error":{"code":"not_found","message":"no","retryable":false}}'
    async with Server(lambda request, writer: writer.write(answer(body, status=404))) as url:
        client = ServiceClient("t", [url], backoff=FAST)
        with pytest.raises(UpstreamError) as err:
            await client.call("POST", "/x", Echo(text="a"), Echo, idempotent=False)
        await client.aclose()
    assert err.value.status == 404 and err.value.body.error.message == "no"


async def test_an_idle_connection_past_the_client_keep_alive_is_not_reused(monkeypatch):
    monkeypatch.setattr(http, "CLIENT_KEEP_ALIVE_S", 0.0)
    server = Server(echo)
    async with server as url:
        client = ServiceClient("t", [url], backoff=FAST)
        for _ in range(2):
            await client.call("POST", "/x", Echo(text="a"), Echo, idempotent=False)
        await client.aclose()
    assert server.connections == 2


def test_a_url_that_is_not_http_is_refused():
    with pytest.raises(ValueError, match="not an http"):
        http._Pool("ftp://example")  # noqa: SLF001


def test_a_client_used_again_from_a_new_event_loop_starts_afresh():
    """Connections belong to their loop: a client kept across asyncio.run
    calls (a CLI, a test) connects again instead of using a dead loop's."""
    import threading

    served = threading.Event()

    async def one_call(url: str) -> str:
        return (await client.call("POST", "/x", Echo(text="a"), Echo, idempotent=False)).text

    async def serve_twice() -> None:
        server = Server(echo)
        async with server as url:
            urls.append(url)
            served.set()
            while len(server.requests) < 2:
                await asyncio.sleep(0.01)

    urls: list[str] = []
    thread = threading.Thread(target=asyncio.run, args=(serve_twice(),))
    thread.start()
    assert served.wait(10)
    client = ServiceClient("t", urls, backoff=FAST)
    assert asyncio.run(one_call(urls[0])) == "a"
    assert asyncio.run(one_call(urls[0])) == "a"  # the first loop and its connection are gone
    thread.join(10)
    assert not thread.is_alive()
