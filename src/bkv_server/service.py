"""Pieces every service shares: the FastAPI frontend's request guards and
health endpoints, and the uvicorn runner for any ASGI app."""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bkv_server import metrics
from bkv_server.rpc import MAX_BODY_BYTES, error_body, retry_after, validation_message
from bkv_protocol.wire import ErrorBody, ErrorCode


def error_response(status: int, code: ErrorCode, message: str, retryable: bool = False,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return passthrough_response(status, error_body(code, message, retryable), headers)


def passthrough_response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error body as it is -- an upstream's, or from an ErrorTable -- with
    retry advice if retryable (``rpc.retry_after``, the rule RpcApp follows too)."""
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers={**(headers or {}),
                                                                                     **retry_after(body)})


class GuardAndMeasure:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware costs a task and
    a stream per request): 405 for a method a known path does not declare,
    content-type and size checks, latency metrics."""

    def __init__(self, app, service: str, routes: Iterable[str] | None = None,
                 methods: Mapping[str, frozenset[str]] | None = None) -> None:
        """``routes``: the declared route templates, the only values the
        operation label takes (else ``unmatched``); by default the routes of
        ``app`` (a FastAPI or Starlette app). ``methods``: path -> the methods
        it declares (by default ``route_methods(app)`` at the first request);
        any other method on that path is 405, before the content type is
        looked at, so a PUT is never told to change its body."""
        self.app = app
        self.service = service
        self.routes = metrics.RouteTable(route_templates(app) if routes is None else routes)
        self._methods = methods

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self._methods is None:
            self._methods = route_methods(self.app)
        allowed = self._methods.get(path)
        if allowed is not None and scope["method"] not in allowed:
            await error_response(405, ErrorCode.METHOD_NOT_ALLOWED, "method not allowed on this path",
                                 headers={"Allow": ", ".join(sorted(allowed))})(scope, receive, send)
            return
        # Bodies are checked only where a route may read one: an unknown path is the app's 404.
        known = allowed is not None or self.routes.label(path) != metrics.UNMATCHED
        if known and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                await error_response(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send application/json")(scope, receive, send)
                return
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                await error_response(413, ErrorCode.PAYLOAD_TOO_LARGE,
                                     f"bodies are limited to {MAX_BODY_BYTES} bytes")(scope, receive, send)
                return
        if path in _UNMEASURED:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.observe_http(self.service, self.routes, path, scope["method"], status[0],
                                 time.perf_counter() - start)


_UNMEASURED = frozenset({"/metrics", "/healthz", "/readyz"})


class _RoutesOf:
    def __init__(self, app) -> None:
        self._app = app

    def __iter__(self):
        return iter(route_templates(self._app))


def route_templates(app) -> list[str]:
    """The path templates a Starlette/FastAPI app declares (empty if ``app``
    has no router: every request is then ``unmatched``)."""
    return [r.path for r in getattr(app, "routes", ()) if isinstance(getattr(r, "path", None), str)]


def route_methods(app) -> dict[str, frozenset[str]]:
    """Each plain path an app declares, with the methods it answers there
    (paths with parameters are left to the app's router)."""
    out: dict[str, frozenset[str]] = {}
    for r in getattr(app, "routes", ()):
        path, methods = getattr(r, "path", None), getattr(r, "methods", None)
        if isinstance(path, str) and methods and "{" not in path:
            out[path] = out.get(path, frozenset()) | frozenset(methods)
    return out


def install_common(app: FastAPI, service: str, *, ready: Callable[[], bool], guard: bool = True) -> None:
    """Validation errors as 400, request guards, metrics, health. ``guard=False``:
    the caller wraps the app in GuardAndMeasure itself (the frontend, around its fast path)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, ErrorCode.INVALID_REQUEST, validation_message(exc))

    if guard:
        # Starlette builds the middleware at the first request, when every route is declared.
        app.add_middleware(GuardAndMeasure, service=service, routes=_RoutesOf(app))

    @app.get("/healthz", include_in_schema=False)
    async def _healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def _readyz():
        if ready():
            return {"status": "ready"}
        return error_response(503, ErrorCode.UNAVAILABLE, "not ready", retryable=True)

    @app.get("/metrics", include_in_schema=False)
    async def _metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class _OneWrite:
    """A connection's transport whose writes within one loop tick leave as one
    send: uvicorn writes a response's head and body apart, which on loopback
    or a cluster network is two segments, two syscalls and often two wake-ups
    of the reader, for answers of a few hundred bytes (docs/performance.md,
    "The lean internal client")."""

    __slots__ = ("_transport", "_pending", "_loop")

    def __init__(self, transport, loop) -> None:
        self._transport, self._pending, self._loop = transport, [], loop

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()  # what was written before close() still goes out first
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def _one_write_protocol():
    import asyncio

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class OneWriteHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(_OneWrite(transport, asyncio.get_running_loop()))

    return OneWriteHttpToolsProtocol


def run(app, host: str, port: int, metrics_port: int = 0) -> None:
    import uvicorn

    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=host)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # access_log off: request lines are noise at load and carry no value here.
    from bkv_server.http import SERVER_KEEP_ALIVE_S

    uvicorn.run(app, host=host, port=port, access_log=False, loop="uvloop", http=_one_write_protocol(),
                log_level="warning", timeout_graceful_shutdown=5, lifespan="on",
                timeout_keep_alive=SERVER_KEEP_ALIVE_S)
