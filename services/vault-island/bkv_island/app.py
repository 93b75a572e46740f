"""The island's HTTP face and its one exception-to-HTTP mapping."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bkv_common.http import UpstreamError, UpstreamUnavailable
from bkv_common.service import error_response, install_common, passthrough_response
from bkv_common.wire import ErrorCode
from bkv_island import api, errors
from bkv_island.core import Island

_STATUS = {
    errors.NoRecord: (404, ErrorCode.NO_RECORD, False),
    errors.RecordDestroyed: (410, ErrorCode.RECORD_DESTROYED, False),
    errors.Contended: (409, ErrorCode.CONFLICT, True),
    errors.StoreUnavailable: (503, ErrorCode.UNAVAILABLE, True),
}


def create_app(island: Island, *, ready=lambda: True) -> FastAPI:
    app = FastAPI(title=f"bkv vault-island {island.island_id}", docs_url=None, redoc_url=None)
    install_common(app, "vault-island", ready=ready)

    @app.exception_handler(errors.IslandError)
    async def _island_error(_: Request, exc: errors.IslandError) -> JSONResponse:
        status, code, retryable = _STATUS[type(exc)]
        return error_response(status, code, str(exc), retryable, {"Retry-After": "1"} if status == 503 else None)

    @app.exception_handler(UpstreamError)
    async def _upstream(_: Request, exc: UpstreamError) -> JSONResponse:
        return passthrough_response(exc.status, exc.body)

    @app.exception_handler(UpstreamUnavailable)
    async def _unavailable(_: Request, exc: UpstreamUnavailable) -> JSONResponse:
        return error_response(503, ErrorCode.UNAVAILABLE, "the HSM is unreachable; try again shortly", True,
                              {"Retry-After": "1"})

    @app.post("/island/v1/registration/start")
    async def registration_start(req: api.RegistrationStartIn) -> api.RegistrationStartOut:
        return await island.registration_start(req)

    @app.post("/island/v1/registration/finish")
    async def registration_finish(req: api.RegistrationFinishIn) -> api.RegistrationFinishOut:
        return await island.registration_finish(req)

    @app.post("/island/v1/recovery/start")
    async def recovery_start(req: api.RecoveryStartIn) -> api.RecoveryStartOut:
        return await island.recovery_start(req)

    @app.post("/island/v1/recovery/finish")
    async def recovery_finish(req: api.RecoveryFinishIn) -> api.RecoveryFinishOut:
        return await island.recovery_finish(req)

    @app.post("/island/v1/record/delete")
    async def delete(req: api.DeleteIn) -> api.DeleteOut:
        return await island.delete(req)

    @app.post("/island/v1/admin/move")
    async def move(req: api.MoveIn) -> api.MoveOut:
        return await island.move(req)

    return app
