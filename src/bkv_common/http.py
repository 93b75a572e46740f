"""Calls between services: one pooled ``httpx.AsyncClient`` per target,
failover across the target's replicas, retries through the one retry helper.

A request is retried on another replica when it certainly was not processed
(connection refused; 503 unless ``retry_503=False``) -- or, for idempotent operations, after any
transport error. Non-idempotent requests that may have been processed are
never replayed by this layer.
"""

from __future__ import annotations

import itertools
from typing import Callable, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from bkv_common import metrics
from bkv_common.retry import Backoff, DeadlineExceeded, retry
from bkv_common.wire import ErrorBody, ErrorCode, ErrorDetail

M = TypeVar("M", bound=BaseModel)


class UpstreamError(Exception):
    """The upstream answered with an error body: pass it on unchanged."""

    def __init__(self, status: int, body: ErrorBody) -> None:
        super().__init__(f"{status} {body.error.code.value}: {body.error.message}")
        self.status = status
        self.body = body


class UpstreamUnavailable(Exception):
    """No replica of the upstream answered before the deadline."""


class _Retryable(Exception):
    pass


class ServiceClient:
    def __init__(self, name: str, urls: Callable[[], list[str]] | list[str], *,
                 backoff: Backoff = Backoff(deadline_s=5.0), timeout_s: float = 10.0,
                 retry_503: bool = True) -> None:
        self.name = name
        self._urls = urls if callable(urls) else (lambda u=list(urls): u)
        self._backoff = backoff
        self._rr = itertools.count()
        # A 503 from a tier that already retried its own upstream is passed on,
        # not retried again: nested retries would multiply the wait.
        self._retry_503 = retry_503
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(timeout=timeout_s, limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, body: BaseModel | None, out: type[M], *,
                   idempotent: bool) -> M:
        start = next(self._rr)

        async def attempt(n: int) -> M:
            urls = self._urls()
            if not urls:
                raise _Retryable("no replicas known")
            base = urls[(start + n) % len(urls)]
            if n:
                metrics.RETRIES.labels(self.name).inc()
            try:
                resp = await self._http.request(
                    method, base + path,
                    content=None if body is None else body.model_dump_json(),
                    headers={"content-type": "application/json"} if body is not None else None,
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                raise _Retryable(f"{self.name} unreachable at {base}") from exc
            except httpx.TransportError as exc:
                if idempotent:
                    raise _Retryable(f"{self.name} failed mid-request") from exc
                raise UpstreamUnavailable(f"{self.name} failed mid-request; the outcome is unknown") from exc
            if resp.status_code < 300:
                try:
                    return out.model_validate_json(resp.content)
                except ValidationError as exc:
                    raise UpstreamUnavailable(f"{self.name} sent a malformed answer") from exc
            try:
                err = ErrorBody.model_validate_json(resp.content)
            except ValidationError:
                err = ErrorBody(error=ErrorDetail(code=ErrorCode.INTERNAL,
                                                  message=f"{self.name} answered {resp.status_code}"))
            if resp.status_code == 503 and self._retry_503:
                raise _Retryable(err.error.message)
            raise UpstreamError(resp.status_code, err)

        try:
            return await retry(attempt, retry_on=lambda e: isinstance(e, _Retryable), backoff=self._backoff)
        except DeadlineExceeded as exc:
            raise UpstreamUnavailable(f"{self.name} unavailable: {exc.__cause__}") from exc
