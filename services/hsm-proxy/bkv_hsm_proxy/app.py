"""The hsm-proxy's HTTP face. Handlers run on the event-loop thread, so
every PKCS#11 call happens on one thread (SoftHSM2 is not safe otherwise)."""

from __future__ import annotations

from bkv_server.rpc import RpcApp, error_body
from bkv_protocol.wire import ErrorBody, ErrorCode
from bkv_protocol import hsm_api as api
from bkv_hsm_proxy import errors
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


def map_error(exc: Exception) -> tuple[int, ErrorBody] | None:
    for cls, status, code, retryable in _STATUS:
        if isinstance(exc, cls):
            return status, error_body(code, str(exc), retryable)
    return None


def create_app(vault: VaultHsm) -> RpcApp:
    def sync(fn):
        async def handler(req):
            return fn(req)

        return handler

    async def fleet() -> api.FleetParams:
        return vault.params()

    return RpcApp("hsm-proxy", {
        "/hsm/v1/registration/start": (api.RegistrationStartIn, sync(vault.registration_start)),
        "/hsm/v1/registration/finish": (api.RegistrationFinishIn, sync(vault.registration_finish)),
        "/hsm/v1/login/start": (api.LoginStartIn, sync(vault.login_start)),
        "/hsm/v1/login/finish": (api.LoginFinishIn, sync(vault.login_finish)),
        "/hsm/v1/reseal": (api.ResealIn, sync(vault.reseal)),
        "/hsm/v1/migrate": (api.MigrateIn, sync(vault.migrate)),
        "/hsm/v1/reply/open": (api.ReplyOpenIn, sync(vault.open_reply)),
        "/hsm/v1/refusal": (api.RefusalIn, sync(vault.refusal)),
    }, map_error=map_error, get_routes={"/hsm/v1/fleet": fleet})
