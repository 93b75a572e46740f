"""The operation catalogue (bkv_protocol.operations): each client operation
once, the same body on every hop, one status per code. Unit tests of logic
(the SDK's fallback runs against an httpx MockTransport, a fake vault)."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from bkv_protocol import hsm_api, island_api, operations as ops, v1
from bkv_protocol.wire import ErrorCode


def _public_fields(model) -> set[str]:
    return set(model.model_fields)


@pytest.mark.parametrize("op", ops.CATALOGUE, ids=lambda op: op.name)
def test_every_hop_carries_the_public_body_and_only_what_the_hop_adds(op):
    body = _public_fields(op.request)
    assert _public_fields(op.island_request) == body | {"user_id", "legacy"}
    assert _public_fields(op.hsm_request) == body | {"user_id", "island", "current"}
    assert op.name == op.name.lower() and op.path.startswith("/v1/")


@pytest.mark.parametrize("op", [op for op in ops.CATALOGUE if op.route is not None], ids=lambda op: op.name)
def test_a_writes_fingerprint_is_the_transcripts_over_the_fields_the_catalogue_names(op):
    values = {"challenge": b"c" * 40, "registration_upload": b"u" * 100, "ek": b"e" * 48, "k_nonce": b"n" * 12,
              "ticket": b"t" * 80, "credential_request": b"r" * 32, "login_state": b"s" * 200,
              "credential_finalization": b"f" * 64, "ticket_proof": b"p" * 32}
    body = {f: values[f] for f in _public_fields(op.request) if f in values}
    req = op.island_request.model_validate({**body, "user_id": "alice", "request_id": os.urandom(16)})
    expected = op.fingerprint(None, "alice", req.request_id, *(values[f] for f in op.fields))
    assert op.request_fingerprint(req) == expected
    assert op is ops.BY_ROUTE[op.route]
    # The hsm-proxy's request is the island's with the island and the entry read: same fingerprint.
    current = hsm_api.Entry(state=hsm_api.EntryState.ABSENT, version=0)
    assert op.request_fingerprint(op.to_hsm(req, "island-a", current)) == expected


def test_an_op_keeps_v1s_internal_wire_names_so_either_tier_may_roll_first():
    """A recovery is OPAQUE's login phase: an island of the build before the
    catalogue sends ``login_start``, and one of this build sends it too."""
    current = hsm_api.Entry(state=hsm_api.EntryState.ABSENT, version=0)
    start = ops.RECOVER_START.hsm_request(user_id="alice", island="island-a", current=current,
                                         request_id=b"r" * 16, credential_request=b"x" * 32)
    op = hsm_api.Op(kind=hsm_api.OpKind.RECOVER_START, proof=b"p", recover_start=start)
    wire = json.loads(op.model_dump_json())
    assert wire["kind"] == "login_start" and "login_start" in wire and "recover_start" not in wire
    assert hsm_api.Op.model_validate_json(op.model_dump_json()).body() == start


def test_every_code_has_one_status_and_the_error_tables_take_it_from_the_catalogue():
    from bkv_hsm_proxy import errors as hsm_errors
    from bkv_island import errors as island_errors

    assert set(ops.STATUS) == set(ErrorCode)
    assert island_errors.TABLE.rule_for(island_errors.NoRecord).status == ops.STATUS[ErrorCode.NO_RECORD] == 404
    assert hsm_errors.TABLE.rule_for(hsm_errors.AuthenticationFailed).status == 403


def test_the_sdk_recovers_through_v1s_old_route_from_a_vault_built_before_the_catalogue():
    """A vault that has no /v1/recover/* yet answers 404 not_found: the SDK
    sends the same request (same request id) to /v1/login/*, once."""
    from bkv import errors
    from bkv.sdk import VaultClientSync

    seen: list[str] = []

    def vault(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/v1/recover/start":
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such endpoint",
                                                        "retryable": False}})
        return httpx.Response(404, json={"error": {"code": "no_record", "message": "no record",
                                                    "retryable": False}})

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    fleet_key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    client = VaultClientSync("http://vault", fleet_key, "alice", "t", transport=httpx.MockTransport(vault))
    with pytest.raises(errors.UnsignedAnswer):  # the old route answered; unsigned, so not acted on
        client._drive(client.protocol.recover_start(b"x" * 32))
    assert seen == ["/v1/recover/start", "/v1/login/start"]
    assert ops.RECOVER_START.aliases == ("/v1/login/start",) and isinstance(v1.RecoverStartRequest, type)
    assert island_api.RecoverStartIn is ops.RECOVER_START.island_request


def test_every_wire_model_of_every_hop_is_fully_defined():
    """A model whose annotation names a type its module no longer imports
    fails only when a request arrives (a 500): build every schema now."""
    import pydantic

    from bkv_protocol import hsm_api, island_api, v1

    for module in (v1, island_api, hsm_api):
        for name in dir(module):
            model = getattr(module, name)
            if isinstance(model, type) and issubclass(model, pydantic.BaseModel):
                assert model.model_json_schema(), f"{module.__name__}.{name}"
