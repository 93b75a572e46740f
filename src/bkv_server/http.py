"""Calls between services: a lean HTTP/1.1 client (:class:`_Pool`, kept-alive
connections parsed with httptools, uvicorn's own parser) per target,
failover across the target's replicas, retries through the one retry helper.

Why not aiohttp (which this replaced) or httpx: for these small JSON calls on
loopback or a cluster network, a request's Python cost is most of its CPU;
aiohttp spent ~0.2 ms of client CPU per call, this ~0.07 ms
(docs/performance.md, "The lean internal client"). Only what the hops use:
POST/GET, Content-Length or chunked answers, keep-alive, http and https.

A request is retried on another replica when it certainly was not processed
(connection refused; 503 unless ``retry_503=False``) -- or, for idempotent
operations, after any transport error. Non-idempotent requests that may have
been processed are never replayed by this layer.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import ssl
import time
import zlib
from typing import Callable, TypeVar
from urllib.parse import urlsplit

import httptools
from pydantic import BaseModel, ValidationError

from bkv_server import metrics
from bkv_protocol.retry import Backoff, DeadlineExceeded, retry
from bkv_protocol.wire import ErrorBody, ErrorCode, ErrorDetail

M = TypeVar("M", bound=BaseModel)


# Keep-alive of the internal hops: the client side must be the shorter one.
SERVER_KEEP_ALIVE_S = 30
CLIENT_KEEP_ALIVE_S = 10
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # an upstream cannot make a caller buffer without bound
CONNECTIONS_PER_TARGET = 64


class UpstreamError(Exception):
    """The upstream answered with an error body: pass it on unchanged."""

    def __init__(self, status: int, body: ErrorBody) -> None:
        super().__init__(f"{status} {body.error.code.value}: {body.error.message}")
        self.status = status
        self.body = body


class UpstreamUnavailable(Exception):
    """No replica of the upstream answered before the deadline."""


class UpstreamOutcomeUnknown(UpstreamUnavailable):
    """A non-idempotent request may have been processed before the connection
    broke: it must not be sent again blindly, and the caller must say so."""


class _Retryable(Exception):
    pass


class _ConnectFailed(Exception):
    """No connection could be made: the request was certainly not sent."""


class _Disconnected(Exception):
    """The connection closed before any answer came: the request may have been processed."""


class _Broken(Exception):
    """The answer was cut short or malformed, or too large."""


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._started = False  # a byte of the answer arrived
        self._keep = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(_Broken("the connection broke mid-answer") if self._started
                                       else _Disconnected("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            self.close()  # bytes nobody asked for: this connection cannot be trusted to frame answers
            return
        self._started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(_Broken(f"a malformed answer ({type(exc).__name__})"))

    # httptools callbacks
    def on_body(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > MAX_ANSWER_BYTES:
            self._fail(_Broken(f"an answer over {MAX_ANSWER_BYTES} bytes"))
            return
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        self._keep = self._parser.should_keep_alive()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result((self._parser.get_status_code(), b"".join(self._body)))

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            try:
                self.transport.close()
            except RuntimeError:  # its event loop is closed (a client reused from a new loop): nothing to do
                pass

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        self._answer = asyncio.get_running_loop().create_future()
        self._body, self._size, self._started, self._keep = [], 0, False, True
        self.transport.write(request)
        try:
            return await self._answer
        except BaseException:
            self.close()  # cancelled or failed mid-request: a late answer must never reach the next caller
            raise

    @property
    def reusable(self) -> bool:
        return self._keep and not self.closed


class _Pool:
    """Kept-alive connections to one origin (scheme, host, port), at most
    CONNECTIONS_PER_TARGET at once; idle ones go after CLIENT_KEEP_ALIVE_S,
    before the server's own keep-alive ends (so a request is never sent on a
    connection the server is closing)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url[:128]!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._host_header = parts.netloc.rpartition("@")[2].encode()
        self._idle: collections.deque[_Connection] = collections.deque()
        self._slots = asyncio.Semaphore(CONNECTIONS_PER_TARGET)

    async def _connection(self, connect_timeout: float) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: warmest, least likely closed
            if not conn.closed and now - conn.idle_since < CLIENT_KEEP_ALIVE_S:
                return conn
            conn.close()
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await asyncio.get_running_loop().create_connection(
                    _Connection, self.host, self.port, ssl=self._ssl)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise _ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        return conn

    async def request(self, method: str, path: str, data: bytes | None, connect_timeout: float) -> tuple[int, bytes]:
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), b"host: ", self._host_header, b"\r\n"]
        if data is not None:
            head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(data))
        head.append(b"\r\n")
        async with self._slots:
            conn = await self._connection(connect_timeout)
            answer = await conn.exchange(b"".join(head) + (data or b""))
            if conn.reusable:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()
            return answer

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


class ServiceClient:
    def __init__(self, name: str, urls: Callable[[], list[str]] | list[str], *,
                 backoff: Backoff = Backoff(deadline_s=5.0), timeout_s: float = 10.0,
                 retry_503: bool = True) -> None:
        self.name = name
        self._urls = urls if callable(urls) else (lambda u=list(urls): u)
        self._backoff = backoff
        self._timeout_s = timeout_s
        self._connect_timeout_s = min(2.0, timeout_s)
        self._rr = itertools.count()
        # A 503 from a tier that already retried its own upstream is passed on,
        # not retried again: nested retries would multiply the wait.
        self._retry_503 = retry_503
        self._pools: dict[str, _Pool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _pool(self, base: str) -> _Pool:
        # Connections belong to the running loop: a client used from a new loop starts afresh.
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            for pool in self._pools.values():
                pool.close()
            self._pools, self._loop = {}, loop
        pool = self._pools.get(base)
        if pool is None:
            pool = self._pools[base] = _Pool(base)
        return pool

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools = {}

    async def call_raw(self, method: str, path: str, body: BaseModel | None, *, idempotent: bool,
                       affinity: str | None = None) -> tuple[int, bytes]:
        """Send, with failover and retries; return (status, body bytes) of the
        first answer that is not retryable. Errors are not decoded here.
        With ``affinity``, the same key prefers the same replica (warm caches)."""
        start = zlib.crc32(affinity.encode()) if affinity is not None else next(self._rr)
        data = None if body is None else body.model_dump_json().encode()

        async def attempt(n: int) -> tuple[int, bytes]:
            urls = self._urls()
            if not urls:
                raise _Retryable("no replicas known")
            base = urls[(start + n) % len(urls)]
            if n:
                metrics.child(metrics.RETRIES, self.name).inc()
            try:
                async with asyncio.timeout(self._timeout_s):
                    status, content = await self._pool(base).request(method, path, data, self._connect_timeout_s)
            except _ConnectFailed as exc:
                raise _Retryable(f"{self.name} unreachable at {base}") from exc
            except _Disconnected as exc:
                # A pooled connection the server had closed: not processed, unless it was.
                if idempotent:
                    raise _Retryable(f"{self.name} unreachable at {base}") from exc
                raise UpstreamOutcomeUnknown(f"{self.name} dropped the connection; the outcome is unknown") from exc
            except (_Broken, OSError, TimeoutError) as exc:
                if idempotent:
                    raise _Retryable(f"{self.name} failed mid-request") from exc
                raise UpstreamOutcomeUnknown(f"{self.name} failed mid-request; the outcome is unknown") from exc
            if status == 503 and self._retry_503:
                raise _Retryable(f"{self.name} answered 503")
            return status, content

        try:
            return await retry(attempt, retry_on=lambda e: isinstance(e, _Retryable), backoff=self._backoff)
        except DeadlineExceeded as exc:
            raise UpstreamUnavailable(f"{self.name} unavailable: {exc.__cause__}") from exc

    async def call(self, method: str, path: str, body: BaseModel | None, out: type[M], *, idempotent: bool) -> M:
        status, content = await self.call_raw(method, path, body, idempotent=idempotent)
        if status < 300:
            try:
                return out.model_validate_json(content)
            except ValidationError as exc:
                raise UpstreamUnavailable(f"{self.name} sent a malformed answer") from exc
        raise UpstreamError(status, decode_error(self.name, status, content))


def decode_error(name: str, status: int, content: bytes) -> ErrorBody:
    try:
        return ErrorBody.model_validate_json(content)
    except ValidationError:
        return ErrorBody(error=ErrorDetail(code=ErrorCode.INTERNAL, message=f"{name} answered {status}"))
