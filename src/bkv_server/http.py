"""Calls between services: one pooled aiohttp session per target (cheaper
per request than httpx; see docs/performance.md), failover across the
target's replicas, retries through the one retry helper.

A request is retried on another replica when it certainly was not processed
(connection refused; 503 unless ``retry_503=False``) -- or, for idempotent
operations, after any transport error. Non-idempotent requests that may have
been processed are never replayed by this layer.
"""

from __future__ import annotations

import asyncio
import itertools
import zlib
from typing import Callable, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from bkv_server import metrics
from bkv_protocol.retry import Backoff, DeadlineExceeded, retry
from bkv_protocol.wire import ErrorBody, ErrorCode, ErrorDetail

M = TypeVar("M", bound=BaseModel)
_JSON_HEADERS = {"content-type": "application/json"}


# Keep-alive of the internal hops: the client side must be the shorter one.
SERVER_KEEP_ALIVE_S = 30
CLIENT_KEEP_ALIVE_S = 10


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


class ServiceClient:
    def __init__(self, name: str, urls: Callable[[], list[str]] | list[str], *,
                 backoff: Backoff = Backoff(deadline_s=5.0), timeout_s: float = 10.0,
                 retry_503: bool = True) -> None:
        self.name = name
        self._urls = urls if callable(urls) else (lambda u=list(urls): u)
        self._backoff = backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(2.0, timeout_s))
        self._rr = itertools.count()
        # A 503 from a tier that already retried its own upstream is passed on,
        # not retried again: nested retries would multiply the wait.
        self._retry_503 = retry_503
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        # Created lazily: an aiohttp session belongs to the running loop.
        if self._session is None or self._session.closed:
            # Idle connections are dropped here well before the server's keep-alive
            # timeout (SERVER_KEEP_ALIVE_S), so a request is never sent on a
            # connection the server is closing -- which would look like a
            # connection lost mid-request and end as outcome_unknown.
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, ttl_dns_cache=30, force_close=False,
                                             keepalive_timeout=CLIENT_KEEP_ALIVE_S)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  skip_auto_headers=("User-Agent",), auto_decompress=False)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

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
                metrics.RETRIES.labels(self.name).inc()
            try:
                async with self._http().request(method, base + path, data=data,
                                                headers=_JSON_HEADERS if data is not None else None) as resp:
                    content = await resp.read()
                    status = resp.status
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
                # Refused, or a pooled connection the server had closed: not processed.
                if isinstance(exc, aiohttp.ClientConnectorError) or idempotent:
                    raise _Retryable(f"{self.name} unreachable at {base}") from exc
                raise UpstreamOutcomeUnknown(f"{self.name} dropped the connection; the outcome is unknown") from exc
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
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
