"""The lean HTTP+JSON layer between services (frontend → island → hsm-proxy).

:class:`RpcApp` is a minimal ASGI app: a dict of ``POST path -> (request
model, handler)``, strict content-type and size checks, one exception
mapping (:class:`ErrorTable`, the one every service's errors go through,
the frontend's too), and ``/healthz``, ``/readyz``, ``/metrics``. It does what FastAPI
did for these internal hops at a fraction of the CPU (measured in
docs/performance.md): no dependency injection, no middleware stack, and the
answer is serialized once.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable, Iterator, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from bkv_server import metrics
from bkv_server.http import UpstreamError
from bkv_protocol.operations import STATUS
from bkv_protocol.wire import ErrorBody, ErrorCode, ErrorDetail, SignedState

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
Handler = Callable[[BaseModel], Awaitable[BaseModel]]
_JSON = [(b"content-type", b"application/json")]


def error_body(code: ErrorCode, message: str, retryable: bool = False,
               signature: bytes | None = None, retry_after: int | None = None,
               state: SignedState | None = None) -> ErrorBody:
    return ErrorBody(error=ErrorDetail(code=code, message=message, retryable=retryable, signature=signature,
                                       retry_after=retry_after, state=state))


def retry_after(body: ErrorBody) -> dict[str, str]:
    """The one Retry-After rule of every service: a retryable error answer
    says to retry after the wait its body names (``rate_limited``), else
    after a second; no other answer carries the header."""
    if not body.error.retryable:
        return {}
    return {"Retry-After": str(body.error.retry_after or 1)}


def _header_pairs(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


class ErrorRule(NamedTuple):
    exc: type[Exception]
    code: ErrorCode
    retryable: bool
    message: str | None = None  # said instead of str(exc), where that would name internals

    @property
    def status(self) -> int:
        """The code's one HTTP status (``bkv_protocol.operations.STATUS``)."""
        return STATUS[self.code]


class ErrorTable:
    """A service's exceptions as HTTP answers: rules ``(exception class,
    code, retryable[, message])``, each code with its one status
    (``bkv_protocol.operations.STATUS``), tried with ``isinstance`` in
    order, so a subclass comes before its base (tests/test_unit_error_tables.py
    checks every table). Anything no rule matches is a bug: 500 ``internal``.

    Two things hold for every service, so no table says them: an upstream's
    own error answer (:class:`~bkv_server.http.UpstreamError`) is passed on
    unchanged, and a fleet signature an exception carries (``signature``,
    on the islands' refusals) goes into the body, with the record state it
    covers (``signed_state``), as does the wait a ``rate_limited`` one names
    (``retry_after``, bkv_server.ratelimit)."""

    def __init__(self, *rules: tuple) -> None:
        self.rules = tuple(ErrorRule(*rule) for rule in rules)

    def __iter__(self) -> Iterator[ErrorRule]:
        return iter(self.rules)

    def rule_for(self, cls: type[Exception]) -> ErrorRule | None:
        """The rule an exception of class ``cls`` is answered by."""
        return next((rule for rule in self.rules if issubclass(cls, rule.exc)), None)

    def answer(self, exc: Exception) -> tuple[int, ErrorBody] | None:
        """(status, body) for ``exc``; None if no rule matches."""
        if isinstance(exc, UpstreamError):
            return exc.status, exc.body
        rule = self.rule_for(type(exc))
        if rule is None:
            return None
        return rule.status, error_body(rule.code, rule.message or str(exc), rule.retryable,
                                       getattr(exc, "signature", None), getattr(exc, "retry_after", None),
                                       getattr(exc, "signed_state", None))


def validation_message(exc: ValidationError) -> str:
    # Say which field, never echo the value (it may be key material).
    where = ", ".join(".".join(str(p) for p in e.get("loc", ())) or "body" for e in exc.errors()[:5])
    return f"invalid request: check {where}"


async def read_body(receive) -> bytes | None:
    """An ASGI request's whole body, or None past MAX_BODY_BYTES (a chunked
    body has no length to check up front)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _no_such(method: str, path: str) -> str:
    # Echo a bounded prefix only: the path is whatever the caller sent.
    return f"no such endpoint: {method[:16]} {path[:128]}"


class RpcApp:
    def __init__(self, service: str, routes: dict[str, tuple[type[BaseModel], Handler]], *,
                 errors: ErrorTable, ready: Callable[[], bool] = lambda: True,
                 on_startup: Callable[[], Awaitable[None]] | None = None,
                 on_shutdown: Callable[[], Awaitable[None]] | None = None,
                 get_routes: dict[str, Callable[[], Awaitable[BaseModel]]] | None = None) -> None:
        self.service = service
        self._routes = routes
        self._get = get_routes or {}
        self._errors = errors
        self._ready = ready
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
        # Metric labels: a declared route, or "unmatched" (never the raw path).
        self._labels = metrics.RouteTable([*routes, *self._get])

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET":
            await self._get_request(path, send)
            return
        route = self._routes.get(path)
        if method != "POST" or route is None:
            await self._send_error(send, 404, error_body(ErrorCode.NOT_FOUND, _no_such(method, path)))
            metrics.observe_http(self.service, self._labels, path, method, 404, 0.0)
            return
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            await self._send_error(send, 415, error_body(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send application/json"))
            return
        start = time.perf_counter()
        body = await read_body(receive)
        if body is None:
            await self._send_error(send, 413, error_body(ErrorCode.PAYLOAD_TOO_LARGE,
                                                         f"bodies are limited to {MAX_BODY_BYTES} bytes"))
            return
        model, handler = route
        status, extra = 200, {}
        try:
            out = (await handler(model.model_validate_json(body))).model_dump_json().encode()
        except ValidationError as exc:
            status, out = 400, error_body(ErrorCode.INVALID_REQUEST, validation_message(exc)).model_dump_json().encode()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a mapped answer
            mapped = self._errors.answer(exc)
            if mapped is None:
                log.exception("unexpected error in %s %s", self.service, path)
                mapped = 500, error_body(ErrorCode.INTERNAL, "internal error")
            status, err = mapped
            out, extra = err.model_dump_json().encode(), retry_after(err)
        headers_out = [*_JSON, (b"content-length", b"%d" % len(out)),
                       *_header_pairs(extra)]
        await send({"type": "http.response.start", "status": status, "headers": headers_out})
        await send({"type": "http.response.body", "body": out})
        metrics.observe_http(self.service, self._labels, path, method, status, time.perf_counter() - start)

    async def _get_request(self, path: str, send) -> None:
        extra: list[tuple[bytes, bytes]] = []
        if path == "/healthz":
            status, body, ctype = 200, b'{"status":"ok"}', b"application/json"
        elif path == "/readyz":
            ok = self._ready()
            status, ctype = (200 if ok else 503), b"application/json"
            body = b'{"status":"ready"}'
            if not ok:
                err = error_body(ErrorCode.UNAVAILABLE, "not ready", True)
                body, extra = err.model_dump_json().encode(), _header_pairs(retry_after(err))
        elif path == "/metrics":
            status, body, ctype = 200, generate_latest(), CONTENT_TYPE_LATEST.encode()
        elif path in self._get:
            status, body, ctype = 200, (await self._get[path]()).model_dump_json().encode(), b"application/json"
        else:
            await self._send_error(send, 404, error_body(ErrorCode.NOT_FOUND, _no_such("GET", path)))
            return
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype), *extra]})
        await send({"type": "http.response.body", "body": body})


    @staticmethod
    async def _send_error(send, status: int, err: ErrorBody) -> None:
        await send({"type": "http.response.start", "status": status, "headers": _JSON})
        await send({"type": "http.response.body", "body": err.model_dump_json().encode()})

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self._on_startup:
                        await self._on_startup()
                except Exception as exc:  # noqa: BLE001
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._on_shutdown:
                    await self._on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
