"""Invariants 5 and 6: unsigned or altered answers are refused; challenges
and login states work once."""

from __future__ import annotations

import base64
import json
import os

import httpx
import pytest

from bkv import errors
from bkv_protocol.secrets import BackupKey
from conftest import RecordingTransport, read_entry, unique_user

PW = "a perfectly good password"


def _flip(field: str, on_path: str):
    def mutate(path: str, content: bytes) -> bytes:
        if path != on_path:
            return content
        body = json.loads(content)
        raw = bytearray(base64.b64decode(body[field]))
        raw[len(raw) // 2] ^= 0x01
        body[field] = base64.b64encode(bytes(raw)).decode()
        return json.dumps(body).encode()

    return mutate


@pytest.mark.parametrize("path,field", [
    ("/v1/registration/start", "signature"),
    ("/v1/registration/start", "registration_response"),
    ("/v1/registration/start", "challenge"),
    ("/v1/registration/finish", "signature"),
])
async def test_a_tampered_registration_answer_is_rejected_by_the_client(make_client, path, field):
    client = make_client(unique_user(), transport=RecordingTransport(mutate=_flip(field, path)))
    with pytest.raises(errors.BadSignature):
        await client.register(BackupKey(os.urandom(32)), PW)


@pytest.mark.parametrize("path,field", [
    ("/v1/recover/start", "signature"),
    ("/v1/recover/start", "credential_response"),
    ("/v1/recover/finish", "signature"),
    ("/v1/recover/finish", "wrapped_key"),
    ("/v1/recover/finish", "rk_nonce"),
])
async def test_a_tampered_recovery_answer_is_rejected_by_the_client(make_client, path, field):
    user = unique_user()
    await make_client(user).register(BackupKey(os.urandom(32)), PW)
    client = make_client(user, transport=RecordingTransport(mutate=_flip(field, path)))
    with pytest.raises(errors.BadSignature):
        await client.recover(PW)


async def test_a_forged_attempt_count_is_rejected_by_the_client(make_client):
    user = unique_user()
    await make_client(user).register(BackupKey(os.urandom(32)), PW)

    def lie(path: str, content: bytes) -> bytes:
        if path == "/v1/recover/start":
            body = json.loads(content)
            body["attempts_left"] = 1000
            return json.dumps(body).encode()
        return content

    with pytest.raises(errors.BadSignature):
        await make_client(user, transport=RecordingTransport(mutate=lie)).recover("wrong")


def _post(fleet, user: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(fleet.frontend_url + path, json=body,
                      headers={"authorization": f"Bearer {fleet.issuer().mint(user)}"})


def _new_id(body: dict) -> dict:
    return {**body, "request_id": base64.b64encode(os.urandom(16)).decode()}


async def test_a_resent_registration_finish_gets_the_committed_answer_and_changes_nothing(make_client, fleet, etcd):
    user, k = unique_user(), os.urandom(32)
    rec = RecordingTransport()
    await make_client(user, transport=rec).register(BackupKey(k), PW)
    before = await read_entry(etcd, fleet, user)
    again = _post(fleet, user, "/v1/registration/finish", rec.body("/v1/registration/finish"))
    assert again.status_code == 200 and again.json() == rec.answer("/v1/registration/finish")
    assert await read_entry(etcd, fleet, user) == before
    assert (await make_client(user).recover(PW)).key.reveal() == k


async def test_a_replayed_registration_challenge_is_rejected_and_changes_nothing(make_client, fleet, etcd):
    user, k = unique_user(), os.urandom(32)
    rec = RecordingTransport()
    await make_client(user, transport=rec).register(BackupKey(k), PW)
    before = await read_entry(etcd, fleet, user)
    # The same challenge in a new request (a new id): the challenge is spent.
    replay = _post(fleet, user, "/v1/registration/finish", _new_id(rec.body("/v1/registration/finish")))
    assert replay.status_code == 400 and replay.json()["error"]["code"] == "challenge_rejected"
    assert await read_entry(etcd, fleet, user) == before
    assert (await make_client(user).recover(PW)).key.reveal() == k


async def test_a_challenge_for_one_user_is_refused_for_another(make_client, fleet):
    alice, mallory = unique_user(), unique_user()
    rec = RecordingTransport()
    await make_client(alice, transport=rec).register(BackupKey(os.urandom(32)), PW)
    stolen = _post(fleet, mallory, "/v1/registration/finish", _new_id(rec.body("/v1/registration/finish")))
    assert stolen.status_code == 400 and stolen.json()["error"]["code"] == "challenge_rejected"


async def test_a_replayed_login_state_is_rejected_and_costs_no_attempt(make_client, fleet, etcd):
    user = unique_user()
    await make_client(user).register(BackupKey(os.urandom(32)), PW)
    rec = RecordingTransport()
    await make_client(user, transport=rec).recover(PW)
    before = await read_entry(etcd, fleet, user)
    replay = _post(fleet, user, "/v1/recover/finish", _new_id(rec.body("/v1/recover/finish")))
    assert replay.status_code == 400 and replay.json()["error"]["code"] == "login_state_rejected"
    assert await read_entry(etcd, fleet, user) == before
    with pytest.raises(errors.WrongPassword) as wrong:
        await make_client(user).recover("wrong")
    assert wrong.value.attempts_left == 9


async def test_a_login_state_is_superseded_by_a_newer_attempt(make_client, fleet):
    user = unique_user()
    await make_client(user).register(BackupKey(os.urandom(32)), PW)
    rec = RecordingTransport()
    with pytest.raises(errors.WrongPassword):
        await make_client(user, transport=rec).recover("wrong")
    first_state = rec.answer("/v1/recover/start")["login_state"]
    with pytest.raises(errors.WrongPassword):
        await make_client(user).recover("wrong again")
    stale = _post(fleet, user, "/v1/recover/finish",
                  _new_id({"login_state": first_state, "credential_finalization": base64.b64encode(b"\0" * 64).decode()}))
    assert stale.status_code == 400 and stale.json()["error"]["code"] == "login_state_rejected"
