"""Invariant 9: bad input gets a 4xx with a stable code, never a 500 and
never a state change."""

from __future__ import annotations

import base64
import os

import httpx
import pytest

from bkv_protocol.secrets import BackupKey
from conftest import read_entry, unique_user

PW = "pw for bad input tests"
B = lambda raw: base64.b64encode(raw).decode()  # noqa: E731


@pytest.fixture
async def victim(make_client, fleet, etcd):
    user = unique_user("bad")
    await make_client(user).register(BackupKey(os.urandom(32)), PW)
    return user


def post(fleet, user, path, *, json=None, content=None, headers=None, token=True):
    h = {"content-type": "application/json"}
    if token:
        h["authorization"] = f"Bearer {fleet.issuer().mint(user)}"
    h.update(headers or {})
    return httpx.post(fleet.frontend_url + path, json=json, content=content, headers=h)


RID = B(os.urandom(16))
CASES = [
    # (name, path, body or raw bytes, expected status, expected code)
    ("empty json", "/v1/recover/start", {}, 400, "invalid_request"),
    ("not base64", "/v1/recover/start", {"request_id": RID, "credential_request": "%%%"}, 400, "invalid_request"),
    ("wrong type", "/v1/recover/start", {"request_id": RID, "credential_request": 12}, 400, "invalid_request"),
    ("unknown field", "/v1/recover/start", {"request_id": RID, "credential_request": B(b"x" * 96), "user_id": "someone-else"}, 400,
     "invalid_request"),
    ("short opaque", "/v1/recover/start", {"request_id": RID, "credential_request": B(b"x")}, 400, "malformed_opaque_message"),
    # Not random bytes: about 1 in 300 random 96-byte strings parse as a credential request
    # (and then spend an attempt). 0xff... is no canonical ristretto255 encoding.
    ("garbage opaque", "/v1/recover/start", {"request_id": RID, "credential_request": B(b"\xff" * 96)}, 400,
     "malformed_opaque_message"),
    ("oversized field", "/v1/recover/start", {"request_id": RID, "credential_request": B(os.urandom(10_000))}, 400, "invalid_request"),
    ("not json", "/v1/recover/start", b"{not json", 400, "invalid_request"),
    ("no request id", "/v1/recover/start", {"credential_request": B(os.urandom(96))}, 400, "invalid_request"),
    ("short request id", "/v1/recover/start", {"request_id": B(os.urandom(15)), "credential_request": B(os.urandom(96))},
     400, "invalid_request"),
    ("garbage login state", "/v1/recover/finish",
     {"request_id": RID, "login_state": B(os.urandom(300)), "credential_finalization": B(os.urandom(64))}, 400, "login_state_rejected"),
    ("garbage registration request", "/v1/registration/start", {"registration_request": B(os.urandom(7))}, 400,
     "malformed_opaque_message"),
    ("forged challenge", "/v1/registration/finish",
     {"request_id": RID, "challenge": B(os.urandom(60)), "registration_upload": B(os.urandom(192)), "ek": B(os.urandom(48)),
      "k_nonce": B(os.urandom(12))}, 400, "challenge_rejected"),
    ("wrong ek size", "/v1/registration/finish",
     {"request_id": RID, "challenge": B(os.urandom(60)), "registration_upload": B(os.urandom(192)), "ek": B(os.urandom(5)),
      "k_nonce": B(os.urandom(12))}, 400, "invalid_request"),
]


@pytest.mark.parametrize("name,path,body,status,code", CASES, ids=[c[0] for c in CASES])
async def test_bad_input_gets_a_stable_4xx_and_changes_nothing(fleet, etcd, victim, name, path, body, status, code):
    before = await read_entry(etcd, fleet, victim)
    if isinstance(body, bytes):
        resp = post(fleet, victim, path, content=body)
    else:
        resp = post(fleet, victim, path, json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"]
    assert await read_entry(etcd, fleet, victim) == before


async def test_a_wrong_content_type_gets_415(fleet, victim):
    resp = post(fleet, victim, "/v1/recover/start", content=b"credential_request=x",
                headers={"content-type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"


async def test_an_oversized_body_gets_413(fleet, victim):
    resp = post(fleet, victim, "/v1/recover/start", content=b"{" + b" " * 100_000 + b"}")
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("token", [None, "Bearer", "Bearer not-a-jwt", "Basic dXNlcjpwYXNz"])
async def test_requests_without_a_valid_account_token_get_401_and_change_nothing(fleet, etcd, victim, token):
    before = await read_entry(etcd, fleet, victim)
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = token
    resp = httpx.post(fleet.frontend_url + "/v1/recover/start", json={"credential_request": B(b"x" * 96)},
                      headers=headers)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthenticated"
    assert await read_entry(etcd, fleet, victim) == before


async def test_a_token_from_another_issuer_is_refused(fleet, victim, tmp_path):
    from bkv_dev.issuer import DevIssuer

    forged = DevIssuer.load_or_create(tmp_path).mint(victim)
    resp = httpx.post(fleet.frontend_url + "/v1/recover/start", json={"credential_request": B(b"x" * 96)},
                      headers={"authorization": f"Bearer {forged}"})
    assert resp.status_code == 401


async def test_an_expired_token_is_refused(fleet, victim):
    token = fleet.issuer().mint(victim, ttl_s=-120)
    resp = httpx.post(fleet.frontend_url + "/v1/recover/start", json={"credential_request": B(b"x" * 96)},
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 401


async def test_recovery_for_an_unknown_user_is_a_404_with_a_stable_code(fleet):
    resp = post(fleet, unique_user("nobody"), "/v1/recover/start",
                json={"request_id": RID, "credential_request": B(b"x" * 96)})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "no_record"


def test_the_schema_documents_the_opaque_routes_the_fast_path_answers(fleet):
    """The four OPAQUE routes are answered in front of FastAPI (bkv_frontend/app.py:
    OpaqueFastPath); FastAPI still publishes them, with their models, in the schema."""
    schema = httpx.get(f"{fleet.frontend_url}/openapi.json").json()
    for path, model in (("/v1/registration/start", "RegistrationStartRequest"),
                        ("/v1/registration/finish", "RegistrationFinishRequest"),
                        ("/v1/recover/start", "RecoverStartRequest"),
                        ("/v1/recover/finish", "RecoverFinishRequest")):
        post = schema["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + model), path
        assert "200" in post["responses"]
