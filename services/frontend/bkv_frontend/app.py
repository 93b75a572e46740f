"""The public v1 API and its one exception-to-HTTP mapping."""


import asyncio
import contextlib
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response

from bkv_common.encoding import user_ref
from bkv_common.http import UpstreamError, UpstreamOutcomeUnknown, UpstreamUnavailable, decode_error
from bkv_common.service import error_response, install_common, passthrough_response
from bkv_common.wire import ErrorCode
from bkv_frontend import api
from bkv_frontend.auth import TokenVerifier, Unauthenticated, check_device
from bkv_frontend.routing import FleetView, NotReady
from bkv_island import api as iapi


def create_app(view: FleetView, verifier: TokenVerifier, *, refresh_interval_s: float = 1.0,
               on_shutdown=None, require_device_binding: bool = True, edge_public_key: str = "") -> FastAPI:
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
    install_common(app, "frontend", ready=view.ready)

    @app.exception_handler(Unauthenticated)
    async def _unauth(_: Request, __: Unauthenticated) -> JSONResponse:
        return error_response(401, ErrorCode.UNAUTHENTICATED, "a valid account token is required",
                              headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(UpstreamError)
    async def _upstream(_: Request, exc: UpstreamError) -> JSONResponse:
        return passthrough_response(exc.status, exc.body)

    @app.exception_handler(UpstreamOutcomeUnknown)
    async def _unknown(_: Request, exc: UpstreamOutcomeUnknown) -> JSONResponse:
        return error_response(502, ErrorCode.OUTCOME_UNKNOWN, "the vault lost the connection mid-request; this "
                              "attempt may or may not have been counted")

    @app.exception_handler(UpstreamUnavailable)
    async def _unavailable(_: Request, exc: UpstreamUnavailable) -> JSONResponse:
        return error_response(503, ErrorCode.UNAVAILABLE, "the vault is temporarily unavailable; retry shortly",
                              True, {"Retry-After": "1"})

    @app.exception_handler(NotReady)
    async def _not_ready(_: Request, exc: NotReady) -> JSONResponse:
        return error_response(503, ErrorCode.UNAVAILABLE, "the vault is starting; retry shortly", True,
                              {"Retry-After": "1"})

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
        # Each user sticks to one replica of its island, so that replica's entry cache hits.
        status, content = await island.call_raw("POST", path, body, idempotent=idempotent, affinity=user)
        if status == 404 and await follow_migration(user, home):
            _, island = view.island_for(user)
            status, content = await island.call_raw("POST", path, body, idempotent=idempotent, affinity=user)
        if status >= 400:
            return passthrough_response(status, decode_error("island", status, content))
        return Response(content, status_code=status, media_type="application/json")

    User = Annotated[str, Depends(account)]

    # Over Noise every call is a POST (docs/edge.md), hence the POST twins.
    @app.post("/v1/fleet", include_in_schema=False)
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
    @app.get("/v1/bundle", include_in_schema=False)
    async def bundle() -> Response:
        if view.bundle is None:
            return error_response(404, ErrorCode.NOT_FOUND, "this fleet publishes no validation bundle")
        return Response(view.bundle, media_type="application/json")

    async def follow_migration(user: str, asked: str) -> bool:
        """No record where we looked: perhaps the island map changed under us.
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

    # Each route names its answer model for the OpenAPI schema only; the
    # island's bytes go out unchanged.
    @app.post("/v1/registration/start", response_model=api.RegistrationStartOut)
    async def registration_start(req: api.RegistrationStartRequest, user: User) -> Response:
        return await relay(user, "/island/v1/registration/start",
                           iapi.RegistrationStartIn(user_id=user, fleet_id=req.fleet_id,
                                                    registration_request=req.registration_request),
                           idempotent=True)

    @app.post("/v1/registration/finish", response_model=api.RegistrationFinishOut)
    async def registration_finish(req: api.RegistrationFinishRequest, user: User) -> Response:
        return await relay(user, "/island/v1/registration/finish",
                           iapi.RegistrationFinishIn(user_id=user, fleet_id=req.fleet_id, challenge=req.challenge,
                                                     registration_upload=req.registration_upload, ek=req.ek,
                                                     k_nonce=req.k_nonce), idempotent=False)

    @app.post("/v1/recovery/start", response_model=api.RecoveryStartOut)
    async def recovery_start(req: api.RecoveryStartRequest, user: User) -> Response:
        return await relay(user, "/island/v1/recovery/start",
                           iapi.RecoveryStartIn(user_id=user, fleet_id=req.fleet_id,
                                                credential_request=req.credential_request),
                           idempotent=False)

    @app.post("/v1/recovery/finish", response_model=api.RecoveryFinishOut)
    async def recovery_finish(req: api.RecoveryFinishRequest, user: User) -> Response:
        return await relay(user, "/island/v1/recovery/finish",
                           iapi.RecoveryFinishIn(user_id=user, fleet_id=req.fleet_id, login_state=req.login_state,
                                                 credential_finalization=req.credential_finalization),
                           idempotent=False)

    @app.post("/v1/record/delete", include_in_schema=False)
    @app.delete("/v1/record", response_model=api.DeleteOut)
    async def delete(user: User) -> Response:
        return await relay(user, "/island/v1/record/delete", iapi.DeleteIn(user_id=user), idempotent=True)

    return app
