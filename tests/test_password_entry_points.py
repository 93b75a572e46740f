"""Issue #25's attacks on the password's entry points outside recovery,
against the real fleet (etcd, SoftHSM2, hsm-proxy, islands, frontend as
processes): a token holder or an island tests no password through a
registration start, replaces or deletes no live escrow without its password,
and gets no signed refusal for a request that is not its own; a device
deletes its backups only on a signed deletion.

The same rules with in-memory fakes: tests/test_unit_password_entry_points.py."""

from __future__ import annotations

import base64
import dataclasses
import json
import os

import httpx
import opaque_ke_py as opaque
import pytest

from bkv import errors
from bkv.cli import ExitCode
from bkv.sdk import Call, VaultProtocol
from bkv_island.hsm_client import HsmHttpClient
from bkv_island.ledger import Ledger
from bkv_protocol import hsm_api as hapi
from bkv_protocol import transcripts, v1
from bkv_protocol.encoding import b64d, user_ref
from bkv_protocol.secrets import BackupKey
from bkv_server.fleetmap import rendezvous
from bkv_server.http import UpstreamError
from conftest import unique_user
from support.onpath import OnPath
from test_cli_backup import PW, make_device, make_source

OPRF_ELEMENT = 32  # a Ristretto255 element: the first bytes of each OPAQUE message that carries one


def B(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hsm_url(fleet) -> str:
    return f"http://127.0.0.1:{fleet.ports.hsm_proxy(0)}"


def island_url(fleet, user: str) -> str:
    return f"http://127.0.0.1:{fleet.ports.island(fleet.spec.islands.index(rendezvous(user, fleet.spec.islands)), 0)}"


async def registered(make_client, prefix: str) -> tuple[str, BackupKey]:
    user, k = unique_user(prefix), BackupKey(os.urandom(32))
    await make_client(user).register(k, PW)
    return user, k


async def attempts_left(make_client, user: str) -> int:
    """One wrong guess: the fleet's signed count after it."""
    with pytest.raises(errors.WrongPassword) as wrong:
        await make_client(user).recover("certainly not the password")
    return wrong.value.attempts_left


# -- every evaluation of a live record's OPRF key is an attempt ---------------------------------------
async def test_the_token_holder_gets_no_evaluation_under_the_live_key_from_registration_starts(make_client):
    user, k = await registered(make_client, "oracle")
    thief = make_client(user)  # holds the account's credential, not the password
    guess = opaque.client_login_start(b"a candidate").get_message()
    as_login = await thief.recover_start(guess)  # one attempt: the masked CredentialResponse
    live = as_login.credential_response[:OPRF_ELEMENT]
    for _ in range(20):  # the dictionary, through the public API: nothing evaluated under the live key
        out = await thief._send(Call("POST", "/v1/registration/start", v1.RegistrationStartRequest(
            fleet_id=thief.fleet_id, registration_request=guess[:OPRF_ELEMENT]), v1.RegistrationStartOut))
        assert out.registration_response[:OPRF_ELEMENT] != live
    assert await attempts_left(make_client, user) == 8  # the one guess and this one: the starts cost nothing
    assert (await make_client(user).recover(PW)).key == k


async def test_an_island_calling_the_hsm_proxy_directly_gets_no_evaluation_under_the_live_key(fleet, etcd,
                                                                                                make_client):
    user, _ = await registered(make_client, "oracle-island")
    island = rendezvous(user, fleet.spec.islands)
    hsm = HsmHttpClient([hsm_url(fleet)])
    try:
        ledger = Ledger(island, etcd, "/bkv", hsm)
        await ledger.load()
        current = ledger.current(user_ref(user))
        right = opaque.client_login_start(PW.encode()).get_message()
        evaluated = {(await hsm.registration_start(hapi.RegistrationStartIn(
            user_id=user, island=island, current=current, registration_request=right[:OPRF_ELEMENT])))
            .registration_response[:OPRF_ELEMENT] for _ in range(30)}
        assert len(evaluated) == 30  # thirty fresh keys: not one under the record's
        relayed = await make_client(user).recover_start(right)  # a CredentialResponse the island relays
        assert relayed.credential_response[:OPRF_ELEMENT] not in evaluated
        await ledger.sync()
        assert ledger.current(user_ref(user)).version == current.version + 1  # only that guess was counted
    finally:
        await hsm.aclose()


# -- a live escrow changes only through its password ---------------------------------------------------
def _registration_finish(fleet, user: str, island: str, password: bytes) -> dict:
    """What an island that wants the escrow under its own password sends."""
    start = opaque.client_registration_start(password)
    out = httpx.post(f"{island}/island/v1/registration/start",
                     json={"user_id": user, "registration_request": B(start.get_message())}, timeout=10)
    assert out.status_code == 200, out.text
    got = out.json()
    fin = opaque.client_registration_finish(password, start.get_state(), b64d(got["registration_response"]))
    return {"user_id": user, "request_id": B(os.urandom(16)), "challenge": got["challenge"],
            "registration_upload": B(fin.get_message()), "ek": B(os.urandom(48)), "k_nonce": B(os.urandom(12))}


async def test_an_island_cannot_register_a_live_user_again_under_a_password_of_its_choosing(fleet, make_client):
    user, k = await registered(make_client, "replaced")
    island = island_url(fleet, user)
    body = _registration_finish(fleet, user, island, b"the insider's password")
    refused = httpx.post(f"{island}/island/v1/registration/finish", json=body, timeout=10)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "password_proof_required"
    forged = {**body, "request_id": B(os.urandom(16)), "ticket": B(os.urandom(80)), "ticket_proof": B(os.urandom(32))}
    refused = httpx.post(f"{island}/island/v1/registration/finish", json=forged, timeout=10)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "ticket_rejected"
    # Through the public API too, with the account's token: the device's EscrowExists.
    with pytest.raises(errors.EscrowExists):
        await make_client(user).register(BackupKey(os.urandom(32)), "the thief's password")
    assert (await make_client(user).recover(PW)).key == k


async def test_a_delete_sent_to_an_islands_port_without_proof_deletes_nothing(fleet, make_client):
    user, k = await registered(make_client, "undeleted")
    island = island_url(fleet, user)
    bare = httpx.post(f"{island}/island/v1/record/delete", json={"user_id": user}, timeout=10)
    assert bare.status_code == 400 and bare.json()["error"]["code"] == "invalid_request"
    forged = httpx.post(f"{island}/island/v1/record/delete", json={
        "user_id": user, "request_id": B(os.urandom(16)), "ticket": B(os.urandom(80)),
        "ticket_proof": B(os.urandom(32))}, timeout=10)
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "ticket_rejected"
    assert (await make_client(user).recover(PW)).key == k


async def test_a_ticket_seen_by_the_island_deletes_nothing_without_the_devices_proof(fleet, make_client):
    user, k = await registered(make_client, "ticket-seen")
    got = await make_client(user).recover(PW)  # the ticket went through the island in clear
    island = island_url(fleet, user)
    stolen = httpx.post(f"{island}/island/v1/record/delete", json={
        "user_id": user, "request_id": B(os.urandom(16)), "ticket": B(got.ticket.ticket),
        "ticket_proof": B(os.urandom(32))}, timeout=10)
    assert stolen.status_code == 403 and stolen.json()["error"]["code"] == "ticket_rejected"
    # The device's own proof works, once.
    done = await make_client(user).delete(got.ticket)
    assert done.version > 0
    with pytest.raises(errors.LockedOut):
        await make_client(user).recover(PW)


async def test_a_password_change_through_the_sdk_proves_the_old_one_and_keeps_the_key(make_client):
    user, k = await registered(make_client, "changed")
    with pytest.raises(errors.WrongPassword):
        await make_client(user).change_password("not it", "new password")
    assert await make_client(user).change_password(PW, "new password") == k
    assert (await make_client(user).recover("new password")).key == k
    with pytest.raises(errors.WrongPassword):
        await make_client(user).recover(PW)


async def test_a_forgotten_password_is_given_up_by_spending_each_attempt_signed_then_registered_afresh(make_client):
    user, _ = await registered(make_client, "forgot")
    client = make_client(user)
    assert await client.spend_remaining_attempts() == 10
    with pytest.raises(errors.LockedOut):
        await client.recover(PW)
    k2 = BackupKey(os.urandom(32))
    await client.register(k2, "a new start")
    assert (await client.recover("a new start")).key == k2


# -- a refusal answers only the request of the user the log proved -------------------------------------
async def test_a_refusal_asked_with_another_users_proof_does_not_answer_the_victims_request(fleet, etcd, make_client):
    victim, _ = await registered(make_client, "victim")
    island = rendezvous(victim, fleet.spec.islands)
    nobody = next(u for u in (unique_user("absent") for _ in range(64)) if rendezvous(u, fleet.spec.islands) == island)
    hsm = HsmHttpClient([hsm_url(fleet)])
    try:
        ledger = Ledger(island, etcd, "/bkv", hsm)
        await ledger.load()
        proven = ledger.proven(user_ref(nobody))
        rid, request = os.urandom(16), opaque.client_login_start(PW.encode()).get_message()
        out = await hsm.refusal(hapi.RefusalIn(
            user_id=nobody, island=island, current=ledger.current(user_ref(nobody)), proven=proven,
            statements=await ledger.statements_for(proven.head), route="login-start", request_id=rid,
            fields=[request]))
        proto = VaultProtocol(b64d(fleet.fleet_params["fleet_public_key"]), victim)
        victims = transcripts.recover_start_request(None, victim, rid, request)
        assert not proto.refusal_is_signed(Call("POST", "/v1/recover/start", None, None, victims),
                                           transcripts.Refusal.NO_RECORD, out.signature)
        with pytest.raises(UpstreamError) as refused:  # a route no device acts on a refusal of
            await hsm.refusal(hapi.RefusalIn(
                user_id=nobody, island=island, current=ledger.current(user_ref(nobody)), proven=proven,
                statements=await ledger.statements_for(proven.head), route="registration-finish",
                request_id=rid, fields=[request]))
        assert refused.value.body.error.code.value == "invalid_request"
    finally:
        await hsm.aclose()


# -- a device acts on a deletion only when it is signed -------------------------------------------------
DELETE_PATHS = ("/v1/record", "/v1/record/delete")  # DELETE, and its POST twin


@pytest.mark.parametrize("forgery", ["unsigned", "another account's signed deletion"])
def test_a_forged_deletion_answer_never_makes_disable_delete_the_backups(fleet, tmp_path, forgery):
    device = make_device(fleet, tmp_path / "home")
    store = str(tmp_path / "store")
    assert device("backup", str(make_source(tmp_path)), "--store", store).returncode == 0
    signed = None
    if forgery != "unsigned":  # a genuine deletion, of another account: signed, but over another request
        other = make_device(fleet, tmp_path / "other")
        assert other("backup", str(make_source(tmp_path / "o")), "--store", str(tmp_path / "o-store")).returncode == 0
        sniff = OnPath(fleet.frontend_url)
        try:
            cfg = dataclasses.replace(other.config, transport="plaintext", url=sniff.url,
                                      token=fleet.issuer().mint(other.user))
            cfg.save(other.home / "bkv" / "config.toml")
            seen: list[bytes] = []

            def keep(method, path, body, forward):
                answer = forward()
                if path in DELETE_PATHS:
                    seen.append(answer[2])
                return answer

            sniff.handler = keep
            assert other("disable", "--yes").returncode == 0
            signed = json.loads(seen[-1])
        finally:
            sniff.close()

    def forge(method, path, body, forward):
        if path in DELETE_PATHS:  # a tier answers "deleted" and deletes nothing
            return 200, {"content-type": "application/json"}, json.dumps(
                signed or {"deleted": True, "version": 12, "signature": B(os.urandom(70))}).encode()
        return forward()

    box = OnPath(fleet.frontend_url, forge)
    try:
        dataclasses.replace(device.config, transport="plaintext", url=box.url,
                            token=fleet.issuer().mint(device.user)).save(device.home / "bkv" / "config.toml")
        res = device("disable", "--yes", "--store", store, "--delete-backups")
        assert any(path in DELETE_PATHS for _, path in box.seen)
    finally:
        box.close()
        device.config.save(device.home / "bkv" / "config.toml")
    assert res.returncode == ExitCode.BAD_SIGNATURE, res.stderr
    assert len(json.loads(device("list", "--store", store, "--json").stdout)) == 1  # the backup is still there
    assert device("verify", "--store", store).returncode == 0  # and its key still comes back


def test_a_password_change_and_a_forgotten_password_restart_work_through_the_cli(fleet, tmp_path):
    device = make_device(fleet, tmp_path / "home")
    store, src = str(tmp_path / "store"), str(make_source(tmp_path))
    assert device("backup", src, "--store", store).returncode == 0
    res = device("password", "change", "--password-stdin", stdin=f"{PW}\nsecond password\n", password=None)
    assert res.returncode == 0, res.stderr
    assert device("verify", "--store", store, password="second password").returncode == 0
    # Without the password a backup cannot escrow a new key over the live one.
    res = device("backup", src, "--store", str(tmp_path / "s2"), "--new-key",
                 "--yes-abandon-old-backups", password="a guess")
    assert res.returncode == ExitCode.WRONG_PASSWORD, res.stderr
    # Forgotten: the attempts are spent, each one signed, then a new key is made.
    res = device("password", "forgot")  # a script, no terminal: confirm with the flag
    assert res.returncode == ExitCode.USAGE and "--yes-destroy-escrowed-key" in res.stderr
    res = device("password", "forgot", "--yes-destroy-escrowed-key")
    assert res.returncode == 0 and "9 attempts spent" in res.stdout, (res.stdout, res.stderr)
    assert device("verify", "--store", store, password="second password").returncode == ExitCode.LOCKED_OUT
    res = device("backup", src, "--store", str(tmp_path / "s3"), "--new-key",
                 "--yes-abandon-old-backups", password="third password")
    assert res.returncode == 0, res.stderr
    assert device("verify", "--store", str(tmp_path / "s3"), password="third password").returncode == 0


# -- clients built before the catalogue (bkv_protocol.operations) -------------------------------------
async def test_a_client_built_before_the_catalogue_recovers_through_v1_login_and_its_guess_is_counted(
        make_client, monkeypatch):
    """Such a client knows only POST /v1/login/start and /v1/login/finish:
    the vault serves them with the same handlers, so its recovery works and
    each of its guesses spends an attempt as a new client's does."""
    import bkv.sdk
    from bkv_protocol import operations as ops

    user, k = await registered(make_client, "legacy")
    old = dataclasses.replace  # the routes of the build before the catalogue, and no fallback
    monkeypatch.setattr(bkv.sdk, "ops", type("Ops", (), {
        "RECOVER_START": old(ops.RECOVER_START, path="/v1/login/start", aliases=()),
        "RECOVER_FINISH": old(ops.RECOVER_FINISH, path="/v1/login/finish", aliases=()),
        "REGISTRATION_START": ops.REGISTRATION_START, "REGISTRATION_FINISH": ops.REGISTRATION_FINISH}))
    sent: list[str] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request.url.path)

    legacy = make_client(user)
    legacy._http.event_hooks["request"].append(record)
    assert await attempts_left(make_client, user) == 9
    assert (await legacy.recover(PW)).key.reveal() == k.reveal()
    assert await attempts_left(make_client, user) == 9  # the recovery reset the count: one more guess, 9 left
    assert sent == ["/v1/login/start", "/v1/login/finish"]


async def test_a_client_built_before_the_catalogue_gets_no_record_signed_over_its_request(fleet, make_client):
    """Such a client verifies a refusal only in the per-request form (it
    knows no per-state one): a recover start on its route (/v1/login/start)
    at an account with no record gets ``no_record`` signed over that very
    request, with no field it would refuse to parse."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    user = unique_user("legacy-none")
    rid, request = os.urandom(16), opaque.client_login_start(b"pw").get_message()
    fleet_id = fleet.fleet_params["fleet_id"]
    answer = httpx.post(fleet.frontend_url + "/v1/login/start", timeout=30,
                        headers={"authorization": f"Bearer {fleet.issuer().mint(user)}"},
                        json={"fleet_id": fleet_id, "request_id": B(rid), "credential_request": B(request)})
    error = answer.json()["error"]
    assert answer.status_code == 404 and set(error) == {"code", "message", "retryable", "signature"}
    fingerprint = transcripts.recover_start_request(fleet_id, user, rid, request)
    key = load_der_public_key(b64d(fleet.fleet_params["fleet_public_key"]))
    key.verify(b64d(error["signature"]), transcripts.refusal_answer(fleet_id, fingerprint,
                                                                    transcripts.Refusal.NO_RECORD),
               ec.ECDSA(hashes.SHA256()))  # raises if it is not the per-request form
