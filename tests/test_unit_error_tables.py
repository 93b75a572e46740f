"""Every service's error table (``bkv_server.rpc.ErrorTable``) is complete
and in an order where every entry can match."""

from __future__ import annotations

import inspect

import pytest

from bkv_frontend import errors as frontend
from bkv_hsm_proxy import errors as hsm_proxy
from bkv_island import errors as island
from bkv_protocol.wire import ErrorBody, ErrorCode
from bkv_server.http import UpstreamError, UpstreamUnavailable
from bkv_server.rpc import ErrorTable, error_body
from bkv_witness import errors as witness

MODULES = [frontend, island, hsm_proxy, witness]


def _shadowed(table: ErrorTable) -> list[str]:
    """Entries an earlier entry for a superclass (or the same class) always wins over."""
    rules = list(table)
    return [f"{later.exc.__name__} after {earlier.exc.__name__}"
            for i, later in enumerate(rules) for earlier in rules[:i] if issubclass(later.exc, earlier.exc)]


def _own_classes(module) -> list[type[Exception]]:
    return [cls for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, Exception) and cls.__module__ == module.__name__]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_no_entry_of_a_services_table_is_shadowed_by_an_earlier_one(module):
    assert _shadowed(module.TABLE) == []


def test_the_shadow_check_finds_a_subclass_listed_after_its_base():
    table = ErrorTable((hsm_proxy.BadRequest, 400, ErrorCode.INVALID_REQUEST, False),
                       (hsm_proxy.MalformedOpaqueMessage, 400, ErrorCode.MALFORMED_OPAQUE_MESSAGE, False))
    assert _shadowed(table) == ["MalformedOpaqueMessage after BadRequest"]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_exception_of_a_service_is_answered_by_its_table_or_is_a_base_of_one_that_is(module):
    in_table = [rule.exc for rule in module.TABLE]
    for cls in _own_classes(module):
        answered = module.TABLE.rule_for(cls) is not None
        base = any(issubclass(exc, cls) and exc is not cls for exc in in_table)
        assert answered or base, f"{cls.__name__} is in no rule of {module.__name__}.TABLE"
        assert cls.__name__ in module.__doc__, f"{cls.__name__} is not drawn in {module.__name__}'s tree"


def test_a_refusal_keeps_its_fleet_signature_and_an_unknown_exception_is_left_to_the_500():
    status, body = island.TABLE.answer(island.RecordDestroyed("destroyed", b"\x01" * 64))
    assert (status, body.error.code, body.error.signature) == (410, ErrorCode.RECORD_DESTROYED, b"\x01" * 64)
    assert island.TABLE.answer(island.IslandError("a bug")) is None
    assert island.TABLE.answer(KeyError("x")) is None


def test_an_upstreams_answer_passes_unchanged_and_a_fixed_message_hides_the_exceptions_own():
    upstream = error_body(ErrorCode.AUTHENTICATION_FAILED, "the hsm-proxy's words")
    assert frontend.TABLE.answer(UpstreamError(403, upstream)) == (403, upstream)
    status, body = frontend.TABLE.answer(UpstreamUnavailable("island unavailable at http://10.0.0.7:8101"))
    assert status == 503 and "10.0.0.7" not in body.error.message and body.error.retryable
    assert isinstance(body, ErrorBody)


def test_every_outcome_the_catalogue_documents_is_one_a_service_table_or_the_guard_answers_with():
    """The OpenAPI error tables come from the catalogue (bkv_protocol.operations):
    a code listed there that no service gives would be a documented lie."""
    from bkv_protocol import operations as ops

    given = {rule.code for module in MODULES for rule in module.TABLE}
    given |= {ErrorCode.INVALID_REQUEST, ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
              ErrorCode.INTERNAL}  # GuardAndMeasure and body validation
    for op in ops.CATALOGUE:
        assert set(op.outcomes) <= given, (op.name, set(op.outcomes) - given)
    assert set(ops.STATUS) == set(ErrorCode)  # every code has its one status
