"""The hsm-proxy's HTTP face. Handlers are ``async def`` on purpose: they run
on the event-loop thread, so every PKCS#11 call happens on one thread."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bkv_common import metrics
from bkv_common.service import error_response, install_common
from bkv_common.wire import ErrorCode
from bkv_hsm_proxy import api, errors
from bkv_hsm_proxy.core import VaultHsm

# One place maps the exception tree to HTTP.
_STATUS: list[tuple[type[errors.HsmProxyError], int, ErrorCode, bool]] = [
    (errors.MalformedOpaqueMessage, 400, ErrorCode.MALFORMED_OPAQUE_MESSAGE, False),
    (errors.BadRequest, 400, ErrorCode.INVALID_REQUEST, False),
    (errors.ChallengeRejected, 400, ErrorCode.CHALLENGE_REJECTED, False),
    (errors.LoginStateRejected, 400, ErrorCode.LOGIN_STATE_REJECTED, False),
    (errors.AuthenticationFailed, 403, ErrorCode.AUTHENTICATION_FAILED, False),
    (errors.RecordDestroyed, 410, ErrorCode.RECORD_DESTROYED, False),
    (errors.RecordIntegrityFailure, 500, ErrorCode.RECORD_INTEGRITY_FAILURE, False),
    (errors.HsmError, 503, ErrorCode.UNAVAILABLE, True),
]


def status_for(exc: errors.HsmProxyError) -> tuple[int, ErrorCode, bool]:
    for cls, status, code, retryable in _STATUS:
        if isinstance(exc, cls):
            return status, code, retryable
    return 500, ErrorCode.INTERNAL, False


def create_app(vault: VaultHsm) -> FastAPI:
    app = FastAPI(title="bkv hsm-proxy", docs_url=None, redoc_url=None)
    install_common(app, "hsm-proxy", ready=lambda: True)

    @app.exception_handler(errors.HsmProxyError)
    async def _mapped(_: Request, exc: errors.HsmProxyError) -> JSONResponse:
        status, code, retryable = status_for(exc)
        return error_response(status, code, str(exc), retryable, {"Retry-After": "1"} if retryable else None)

    @app.get("/hsm/v1/fleet")
    async def fleet() -> api.FleetParams:
        return vault.params()

    @app.post("/hsm/v1/registration/start")
    async def registration_start(req: api.RegistrationStartIn) -> api.RegistrationStartOut:
        return vault.registration_start(req)

    @app.post("/hsm/v1/registration/finish")
    async def registration_finish(req: api.RegistrationFinishIn) -> api.RegistrationFinishOut:
        return vault.registration_finish(req)

    @app.post("/hsm/v1/login/start")
    async def login_start(req: api.LoginStartIn) -> api.LoginStartOut:
        return vault.login_start(req)

    @app.post("/hsm/v1/login/finish")
    async def login_finish(req: api.LoginFinishIn) -> api.LoginFinishOut:
        return vault.login_finish(req)

    @app.post("/hsm/v1/reseal")
    async def reseal(req: api.ResealIn) -> api.ResealOut:
        return vault.reseal(req)

    return app
