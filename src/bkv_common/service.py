"""Pieces every FastAPI service shares: error mapping helpers, request
validation errors as 4xx, metrics and health endpoints, and a uvicorn runner."""

from __future__ import annotations

import logging
import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bkv_common import metrics
from bkv_common.wire import ErrorBody, ErrorCode, ErrorDetail

MAX_BODY_BYTES = 64 * 1024


def error_response(status: int, code: ErrorCode, message: str, retryable: bool = False,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, retryable=retryable))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def passthrough_response(status: int, body: ErrorBody) -> JSONResponse:
    """An upstream's error, passed on unchanged (with retry advice if retryable)."""
    headers = {"Retry-After": "1"} if body.error.retryable else None
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def install_common(app: FastAPI, service: str, *, ready: Callable[[], bool]) -> None:
    """Validation errors, content type and size checks, metrics, health."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Say which field, never echo the value (it may be key material).
        where = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()[:5])
        return error_response(400, ErrorCode.INVALID_REQUEST, f"invalid request: check {where}")

    @app.middleware("http")
    async def _guard_and_measure(request: Request, call_next):
        route = request.url.path
        if request.method in ("POST", "PUT", "PATCH"):
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return error_response(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send application/json")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                return error_response(413, ErrorCode.PAYLOAD_TOO_LARGE, f"bodies are limited to {MAX_BODY_BYTES} bytes")
        t = time.perf_counter()
        response = await call_next(request)
        if not route.startswith(("/metrics", "/healthz", "/readyz")):
            metrics.HTTP_LATENCY.labels(service, route).observe(time.perf_counter() - t)
            metrics.HTTP_REQUESTS.labels(service, route, str(response.status_code)).inc()
        return response

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


def run(app: FastAPI, host: str, port: int) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # access_log off: request lines are noise at load and carry no value here.
    uvicorn.run(app, host=host, port=port, access_log=False, loop="uvloop", http="httptools",
                log_level="warning", timeout_graceful_shutdown=5)
