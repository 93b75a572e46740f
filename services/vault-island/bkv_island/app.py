"""The island's HTTP face and its one exception-to-HTTP mapping."""

from __future__ import annotations

from bkv_server.http import UpstreamError, UpstreamUnavailable
from bkv_server.rpc import RpcApp, error_body
from bkv_protocol.wire import ErrorBody, ErrorCode
from bkv_protocol import island_api as api
from bkv_island import errors
from bkv_island.core import Island

_STATUS = {
    errors.NoRecord: (404, ErrorCode.NO_RECORD, False),
    errors.RecordDestroyed: (410, ErrorCode.RECORD_DESTROYED, False),
    errors.Contended: (409, ErrorCode.CONFLICT, True),
    errors.RequestIdReused: (409, ErrorCode.REQUEST_ID_REUSED, False),
    errors.RequestSuperseded: (409, ErrorCode.REQUEST_SUPERSEDED, False),
    errors.StoreUnavailable: (503, ErrorCode.UNAVAILABLE, True),
    errors.OutcomeUnknown: (502, ErrorCode.OUTCOME_UNKNOWN, True),
}


def map_error(exc: Exception) -> tuple[int, ErrorBody] | None:
    if isinstance(exc, UpstreamError):  # the hsm-proxy's answer, passed on unchanged
        return exc.status, exc.body
    if isinstance(exc, UpstreamUnavailable):
        return 503, error_body(ErrorCode.UNAVAILABLE, "the HSM is unreachable; try again shortly", True)
    if type(exc) in _STATUS:
        status, code, retryable = _STATUS[type(exc)]
        body = error_body(code, str(exc), retryable)
        if isinstance(exc, errors.Refused) and exc.signature is not None:
            body = body.model_copy(update={"error": body.error.model_copy(update={"signature": exc.signature})})
        return status, body
    return None


def create_app(island: Island, **hooks) -> RpcApp:
    return RpcApp("vault-island", {
        "/island/v1/registration/start": (api.RegistrationStartIn, island.registration_start),
        "/island/v1/registration/finish": (api.RegistrationFinishIn, island.registration_finish),
        "/island/v1/login/start": (api.LoginStartIn, island.login_start),
        "/island/v1/login/finish": (api.LoginFinishIn, island.login_finish),
        "/island/v1/record/delete": (api.DeleteIn, island.delete),
        "/island/v1/admin/move": (api.MoveIn, island.move),
        "/island/v1/admin/migrate": (api.MigrateIn, island.migrate),
        "/island/v1/admin/list-refs": (api.ListRefsIn, island.list_refs),
    }, map_error=map_error, **hooks)
