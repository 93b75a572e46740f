"""Invariant 10 on the real fleet: a resend of a request -- same request id,
same body, to any replica -- is answered from what was committed and never
spends an attempt; an id reused for another body, or resent after a later
change, is refused and changes nothing; ``no_record`` and
``record_destroyed`` are signed and bound to the request they answer; the
registration-finish signature covers ``ek`` and ``k_nonce``."""

from __future__ import annotations

import base64
import json
import os

import httpx
import opaque_ke_py as opaque
import pytest

from bkv import errors
from bkv.sdk import Call, VaultProtocol
from bkv_protocol import transcripts
from bkv_protocol.encoding import b64d
from bkv_server.fleetmap import rendezvous
from bkv_protocol.secrets import BackupKey
from conftest import RecordingTransport, read_entry, unique_user

PW = "a perfectly good password"


def B(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _replica_urls(fleet, user: str) -> list[str]:
    island = rendezvous(user, fleet.spec.islands)
    return [f"http://127.0.0.1:{p.port}" for name, p in fleet.procs.items() if name.startswith(island + "-")]


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _protocol(fleet, user: str) -> VaultProtocol:
    return VaultProtocol(b64d(fleet.fleet_params["fleet_public_key"]), user)


async def _attempts_left(make_client, user: str) -> int:
    """Spends one attempt to read the signed count: the count *before* it."""
    with pytest.raises(errors.WrongPassword) as wrong:
        await make_client(user).recover("certainly not the password")
    return wrong.value.attempts_left + 1


async def test_a_recovery_start_resent_to_every_replica_is_answered_from_the_commit_and_spends_one_attempt(
        make_client, fleet, etcd):
    user = unique_user("resend")
    await make_client(user).register(BackupKey(os.urandom(32)), PW)
    urls = _replica_urls(fleet, user)
    assert len(urls) == 2
    fleet_id = _protocol(fleet, user).fleet_id
    body = {"user_id": user, "fleet_id": fleet_id, "request_id": B(os.urandom(16)),
            "credential_request": B(opaque.client_login_start(b"a wrong guess").get_message())}
    evaluated = sum(_metric(u, "bkv_recover_attempts_spent_total") for u in urls)
    resent = sum(_metric(u, "bkv_resends_answered_total") for u in urls)
    answers = [httpx.post(urls[i % 2] + "/island/v1/login/start", json=body, timeout=20) for i in range(6)]
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1, [a.content for a in answers]  # byte for byte the committed answer
    assert answers[0].json()["attempts_left"] == 9
    assert sum(_metric(u, "bkv_recover_attempts_spent_total") for u in urls) - evaluated == 1
    # At least the other replica had to open the kept answer through the HSM.
    assert sum(_metric(u, "bkv_resends_answered_total") for u in urls) - resent >= 3
    assert await _attempts_left(make_client, user) == 9


async def test_a_request_id_reused_with_another_body_is_refused_and_changes_nothing(make_client, fleet, etcd):
    user = unique_user("reuse")
    await make_client(user).register(BackupKey(os.urandom(32)), PW)
    url = _replica_urls(fleet, user)[0]
    rid = B(os.urandom(16))
    first = httpx.post(url + "/island/v1/login/start", timeout=20, json={
        "user_id": user, "request_id": rid, "credential_request": B(opaque.client_login_start(b"g1").get_message())})
    assert first.status_code == 200
    before = await read_entry(etcd, fleet, user)
    other = httpx.post(url + "/island/v1/login/start", timeout=20, json={
        "user_id": user, "request_id": rid, "credential_request": B(opaque.client_login_start(b"g2").get_message())})
    assert other.status_code == 409 and other.json()["error"]["code"] == "request_id_reused"
    assert await read_entry(etcd, fleet, user) == before


async def test_a_resend_after_a_later_change_is_refused_as_superseded_and_spends_nothing(make_client, fleet, etcd):
    user = unique_user("superseded")
    await make_client(user).register(BackupKey(os.urandom(32)), PW)
    url = _replica_urls(fleet, user)[0]
    body = {"user_id": user, "request_id": B(os.urandom(16)),
            "credential_request": B(opaque.client_login_start(b"g1").get_message())}
    assert httpx.post(url + "/island/v1/login/start", json=body, timeout=20).status_code == 200
    with pytest.raises(errors.WrongPassword):
        await make_client(user).recover("another wrong guess")  # a later change lands
    before = await read_entry(etcd, fleet, user)
    late = httpx.post(url + "/island/v1/login/start", json=body, timeout=20)
    assert late.status_code == 409 and late.json()["error"]["code"] == "request_superseded"
    assert await read_entry(etcd, fleet, user) == before


async def test_no_record_is_signed_for_the_request_it_answers_and_the_client_acts_on_it(make_client, fleet):
    user = unique_user("nobody")
    rec = RecordingTransport()
    with pytest.raises(errors.NoRecord):
        await make_client(user, transport=rec).recover(PW)
    refusal = json.loads([e for e in rec.exchanges if e[0] == "/v1/recover/start"][0][2])["error"]
    assert refusal["code"] == "no_record" and refusal["signature"]
    # The same signature does not vouch for any other request.
    proto = _protocol(fleet, user)
    other = transcripts.recover_start_request(proto.fleet_id, user, os.urandom(16), b"\0" * 32)
    assert not proto.refusal_is_signed(Call("POST", "/v1/recover/start", None, None, other),
                                       transcripts.Refusal.NO_RECORD, b64d(refusal["signature"]))


async def test_record_destroyed_is_signed_and_the_client_acts_on_it(make_client, fleet):
    user = unique_user("gone")
    c = make_client(user)
    await c.register(BackupKey(os.urandom(32)), PW)
    assert await c.disable(PW)
    rec = RecordingTransport()
    with pytest.raises(errors.LockedOut):
        await make_client(user, transport=rec).recover(PW)
    refusal = json.loads([e for e in rec.exchanges if e[0] == "/v1/recover/start"][0][2])["error"]
    assert refusal["code"] == "record_destroyed" and refusal["signature"]


@pytest.mark.parametrize("code,status", [("no_record", 404), ("record_destroyed", 410)])
async def test_an_unsigned_or_replayed_refusal_is_not_acted_on(make_client, fleet, code, status):
    """A tier (or anyone on a plaintext path) that answers no_record /
    record_destroyed itself -- unsigned, or with a signature made for another
    request -- gets UnsignedAnswer, a transport error, never NoRecord/LockedOut."""
    user, stranger = unique_user("victim"), unique_user("stranger")
    await make_client(user).register(BackupKey(os.urandom(32)), PW)
    rec = RecordingTransport()
    with pytest.raises(errors.NoRecord):
        await make_client(stranger, transport=rec).recover(PW)
    foreign_signature = json.loads(rec.exchanges[-1][2])["error"]["signature"]

    class Forge(httpx.AsyncBaseTransport):
        def __init__(self, signature):
            self.signature, self.forged = signature, 0

        async def handle_async_request(self, request):
            if request.url.path == "/v1/recover/start":
                self.forged += 1
                err = {"code": code, "message": "run bkv backup --new-key", "retryable": False}
                if self.signature:
                    err["signature"] = self.signature
                return httpx.Response(status, json={"error": err})
            return httpx.Response(500)

    for signature in (None, foreign_signature):
        forge = Forge(signature)
        with pytest.raises(errors.UnsignedAnswer):
            await make_client(user, transport=forge).recover(PW)
        assert forge.forged == 1
    assert await _attempts_left(make_client, user) == 10


async def test_a_tier_that_swaps_ek_gets_no_valid_registration_signature(make_client, fleet, etcd):
    """The registration-finish signature covers the whole request: an island
    or frontend that replaced ek (so that no one could ever decrypt) is
    caught by the device before it makes a single backup with that key."""
    user = unique_user("swap-ek")

    class SwapEk(httpx.AsyncBaseTransport):
        """Stands in for a tier that rewrites the request it forwards."""

        def __init__(self) -> None:
            self._inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request):
            if request.url.path == "/v1/registration/finish":
                body = json.loads(request.content)
                body["ek"] = B(os.urandom(48))
                request = httpx.Request(request.method, request.url, headers={
                    k: v for k, v in request.headers.items() if k.lower() != "content-length"},
                    content=json.dumps(body).encode())
            return await self._inner.handle_async_request(request)

        async def aclose(self):
            await self._inner.aclose()

    with pytest.raises(errors.BadSignature):
        await make_client(user, transport=SwapEk()).register(BackupKey(os.urandom(32)), PW)
