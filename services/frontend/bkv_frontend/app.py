"""The public v1 API; its errors are answered by ``errors.TABLE`` (``map_error``).

FastAPI serves the API and its schema; the four OPAQUE routes -- the whole
login and registration load -- are answered by :class:`OpaqueFastPath` in
front of it with the same handlers, the same auth and the same error
mapping, without FastAPI's middleware and dependency layers (about a third
of the frontend's CPU per request: docs/performance.md).
"""


import asyncio
import contextlib
import logging
from typing import Annotated, Awaitable, Callable

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from bkv_protocol.encoding import user_ref
from bkv_server.http import UpstreamError, decode_error
from bkv_server.ratelimit import Limiter
from bkv_server.rpc import MAX_BODY_BYTES, read_body, validation_message
from bkv_server.service import (
    GuardAndMeasure,
    error_response,
    install_common,
    passthrough_response,
    route_methods,
    route_templates,
)
from bkv_protocol.wire import ErrorCode
from bkv_protocol import operations as ops
from bkv_protocol import v1 as api
from bkv_protocol.operations import Operation
from bkv_frontend import errors, openapi
from bkv_frontend.auth import DEVICE_HEADER, TokenVerifier, check_device
from bkv_frontend.errors import NotReady
from bkv_frontend.routing import FleetView
from bkv_protocol import island_api as iapi

DEVICE_HEADER_KEY = DEVICE_HEADER.encode()  # as ASGI names it


def create_app(view: FleetView, verifier: TokenVerifier, *, refresh_interval_s: float = 1.0,
               on_shutdown=None, require_device_binding: bool = True, edge_public_key: str = "",
               limiter: Limiter | None = None) -> FastAPI:
    """``limiter``: the per-device limits (scope ``device``, keyed by the
    device key the edge authenticated), checked on the OPAQUE routes before
    the island is asked (docs/architecture.md, "Rate limits")."""
    stop = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        with contextlib.suppress(Exception):
            await view.refresh()
        task = asyncio.create_task(view.run(refresh_interval_s, stop))
        try:
            yield
        finally:
            stop.set()
            await task
            await view.aclose()
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(title="Backup Key Vault", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_common(app, "frontend", ready=view.ready, guard=False)  # the guard wraps the fast path too, below

    def map_error(exc: Exception) -> Response | None:
        """Every expected failure of a public route, as its HTTP answer (None: a bug)."""
        answer = errors.TABLE.answer(exc)
        if answer is None:
            return None
        status, body = answer
        # passthrough_response adds Retry-After to a retryable answer.
        return passthrough_response(status, body, {"WWW-Authenticate": "Bearer"} if status == 401 else None)

    async def _mapped(_: Request, exc: Exception) -> Response:
        return map_error(exc)

    for cls in (UpstreamError, *(rule.exc for rule in errors.TABLE)):
        app.add_exception_handler(cls, _mapped)

    async def _routing(_: Request, exc: StarletteHTTPException) -> Response:
        # The router's own refusals, in the one error shape (GuardAndMeasure
        # answers most 405s before they get here).
        if exc.status_code == 405:
            return error_response(405, ErrorCode.METHOD_NOT_ALLOWED, "method not allowed on this path",
                                  headers=exc.headers)
        if exc.status_code == 404:
            return error_response(404, ErrorCode.NOT_FOUND, "no such endpoint")
        if exc.status_code == 400:  # a body FastAPI could not parse (the delete route's): the one 400 shape
            return error_response(400, ErrorCode.INVALID_REQUEST, "the body is not valid JSON")
        return Response(status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(StarletteHTTPException, _routing)

    # async on purpose: a plain `def` dependency would run in a worker thread.
    async def account(authorization: Annotated[str | None, Header()] = None,
                      x_bkv_device_key: Annotated[str | None, Header()] = None) -> str:
        claims = verifier.verify(authorization)
        check_device(claims, x_bkv_device_key, required=require_device_binding)
        return claims["sub"]

    async def relay(user: str, path: str, body, *, idempotent: bool) -> Response:
        """Send to the user's island and pass its answer through byte for byte:
        the client checks the fleet signature, so parsing it here buys nothing."""
        home, island = view.island_for(user)
        # Every request for an island goes to one preferred replica (the next on failure):
        # it appends the island's log for all of them in batches, where replicas that
        # each appended would race for the log head (bkv_island/ledger.py), and a resend
        # finds the request it repeats still running there (Island._change).
        status, content = await island.call_raw("POST", path, body, idempotent=idempotent, affinity=home)
        if (status == 404 or _wrong_island(status, content)) and await follow_migration(user, home):
            home, island = view.island_for(user)
            status, content = await island.call_raw("POST", path, body, idempotent=idempotent, affinity=home)
        if status >= 400:
            return passthrough_response(status, decode_error("island", status, content))
        return Response(content, status_code=status, media_type="application/json")

    User = Annotated[str, Depends(account)]

    # Over Noise every call is a POST (docs/edge.md), hence the POST twins
    # (this one in the schema: it shares its path with the GET).
    @app.post("/v1/fleet", summary="Fleet (POST twin, for clients over Noise)")
    @app.get("/v1/fleet")
    async def fleet() -> api.FleetInfo:
        if view.params is None:
            raise NotReady()
        p = view.params
        return api.FleetInfo(fleet_id=p["fleet_id"], fleet_public_key=p["fleet_public_key"],
                             max_attempts=p["max_attempts"], opaque_suite=p["opaque_suite"],
                             signature_alg=p["signature_alg"], edge_public_key=edge_public_key)

    # The validation bundle (docs/ota.md): public and self-authenticating, so
    # the edge passes GET /v1/bundle in clear -- a client needs it to learn
    # the edge key it then opens Noise with.
    @app.get("/v1/bundle", summary="The current validation bundle (docs/ota.md)", responses={200: {
        "description": "SignedBundle JSON, self-authenticating: the client checks its signatures",
        "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def bundle() -> Response:
        if view.bundle is None:
            return error_response(404, ErrorCode.NOT_FOUND, "this fleet publishes no validation bundle")
        return Response(view.bundle, media_type="application/json")

    def _wrong_island(status: int, content: bytes) -> bool:
        """The boundary's island set does not place the user's record on the
        island we asked (our map is stale, or records are moving)."""
        return status == 409 and decode_error("island", status, content).error.code is ErrorCode.WRONG_ISLAND

    async def follow_migration(user: str, asked: str) -> bool:
        """No record where we looked, or the boundary's signed island set says
        it is not there alone (``wrong_island``): perhaps the island map changed under us.
        Re-read it; if the user's record is still on its old island while a
        migration runs, move it now. True if asking again may find it."""
        await view.refresh()
        home, _ = view.island_for(user)
        old = view.previous_island_for(user)
        if old is not None:
            await view.client(old).call("POST", "/island/v1/admin/move",
                                        iapi.MoveIn(user_ref=user_ref(user), to_island=home), iapi.MoveOut,
                                        idempotent=True)
        return old is not None or home != asked

    # The client operations (bkv_protocol.operations): the island gets the same
    # body with the account. All are safe to send again: the state-changing
    # ones carry the client's request id, and any replica answers a resend
    # from what was committed.
    def forward(op: Operation, *, legacy: bool = False) -> OpaqueHandler:
        async def handler(req: BaseModel, user: str) -> Response:
            return await relay(user, op.island_path, op.to_island(req, user, legacy=legacy), idempotent=True)

        return handler

    # path: (request model, operation name, handler); an alias marks its requests as
    # a client's built before the catalogue (its refusals signed in the form it checks).
    opaque_routes: dict[str, tuple[type[BaseModel], str, OpaqueHandler]] = {
        path: (op.request, op.name, forward(op, legacy=path != op.path))
        for op in _FAST
        for path in (op.path, *op.aliases)}
    # The same routes in FastAPI, for the schema (/openapi.json); requests to
    # them are answered by OpaqueFastPath before they get here. The aliases
    # (paths of clients built before the catalogue) are served, not documented.
    for op in _FAST:
        for path in (op.path, *op.aliases):
            app.add_api_route(path, _documented(op.request, opaque_routes[path][2], account), methods=["POST"],
                              response_model=op.answer, include_in_schema=path == op.path)

    # Deleting needs proof of the password (a change ticket), like replacing.
    delete_ = forward(ops.DELETE)

    @app.post(ops.DELETE.path, response_model=api.DeleteOut, summary="Delete record (POST twin, over Noise)")
    @app.delete("/v1/record", response_model=api.DeleteOut)
    async def delete(req: api.DeleteRequest, user: User) -> Response:
        return await delete_(req, user)

    openapi.install(app)
    # Metrics name only the routes declared above (every one is in app.routes by now).
    return GuardAndMeasure(OpaqueFastPath(app, opaque_routes, account, map_error, limiter), service="frontend",
                           routes=route_templates(app), methods=route_methods(app))


OpaqueHandler = Callable[[BaseModel, str], Awaitable[Response]]
# The POST routes the fast path answers (the OPAQUE load, and the account's event feed).
_FAST = (ops.REGISTRATION_START, ops.REGISTRATION_FINISH, ops.RECOVER_START, ops.RECOVER_FINISH, ops.EVENTS)
log = logging.getLogger(__name__)


def _documented(model: type[BaseModel], handler: OpaqueHandler, account) -> Callable:
    """A FastAPI endpoint with ``model`` as its body and ``account`` as its
    auth dependency, calling ``handler``."""
    async def endpoint(req: model, user: Annotated[str, Depends(account)]) -> Response:  # type: ignore[valid-type]
        return await handler(req, user)

    return endpoint


class OpaqueFastPath:
    """Pure ASGI: answers ``POST`` on the OPAQUE routes itself -- auth (the
    same ``account``), body validation (400 as FastAPI's handler gives it),
    the handler, errors through the same ``map_error`` -- and passes
    everything else to FastAPI. Undeclared methods (405), content type,
    size and metrics are checked and counted by the GuardAndMeasure around
    both."""

    def __init__(self, app, routes: dict[str, tuple[type[BaseModel], str, OpaqueHandler]], account,
                 map_error: Callable[[Exception], Response | None], limiter: Limiter | None = None) -> None:
        self.app = app
        self._routes = routes
        self._account = account
        self._map_error = map_error
        self._admit = limiter.admit if limiter is not None else None

    async def __call__(self, scope, receive, send) -> None:
        route = self._routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        model, op, handler = route
        try:
            headers = dict(scope["headers"])
            device = _header(headers, DEVICE_HEADER_KEY)
            if self._admit is not None and device:
                # Before the token's signature is checked: the device key is the
                # Noise session's (the processor set it), so a flood is refused
                # at its cheapest. Raises RateLimited: 429, the island is not asked.
                self._admit(op, device)
            user = await self._account(authorization=_header(headers, b"authorization"), x_bkv_device_key=device)
            body = await read_body(receive)
            if body is None:
                response = error_response(413, ErrorCode.PAYLOAD_TOO_LARGE,
                                          f"bodies are limited to {MAX_BODY_BYTES} bytes")
            else:
                response = await handler(model.model_validate_json(body), user)
        except ValidationError as exc:
            response = error_response(400, ErrorCode.INVALID_REQUEST, validation_message(exc))
        except Exception as exc:  # noqa: BLE001 - mapped below; anything unmapped is a bug, answered 500
            response = self._map_error(exc)
            if response is None:
                log.exception("unexpected error in frontend %s", scope["path"])
                response = error_response(500, ErrorCode.INTERNAL, "internal error")
        await response(scope, receive, send)


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value is not None else None
