"""Invariant 4: what etcd holds is sealed, and cannot be moved between users."""

from __future__ import annotations

import base64
import os

import httpx
import pytest

from bkv import errors
from bkv_server.fleetmap import rendezvous
from bkv_protocol.secrets import BackupKey
from bkv_protocol import hsm_api as hapi
from conftest import RecordingTransport, read_entry, unique_user

PW = "hunter2 but longer"


def _forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), base64.b64encode(secret), base64.b64encode(secret).rstrip(b"=")]


async def test_etcd_holds_no_password_file_ek_or_k_in_the_clear(make_client, etcd, fleet):
    user, k = unique_user(), os.urandom(32)
    rec = RecordingTransport()
    await make_client(user, transport=rec).register(BackupKey(k), PW)
    finish = rec.body("/v1/registration/finish")
    ek = base64.b64decode(finish["ek"])
    upload = base64.b64decode(finish["registration_upload"])  # the password file is derived from it
    every_value = b"".join(kv.value for kv in await etcd.get_prefix(b"/"))
    assert every_value  # we are looking at the real store
    for secret in (k, ek, upload[:32], upload[32:96], PW.encode(), user.encode()):
        for form in _forms(secret):
            assert form not in every_value


def _same_island_pair(fleet) -> tuple[str, str]:
    first = unique_user("swap")
    while True:
        other = unique_user("swap")
        if rendezvous(other, fleet.spec.islands) == rendezvous(first, fleet.spec.islands):
            return first, other


async def test_swapping_two_users_sealed_records_makes_both_recoveries_fail_cleanly(make_client, etcd, fleet):
    alice, bob = _same_island_pair(fleet)
    ka, kb = os.urandom(32), os.urandom(32)
    await make_client(alice).register(BackupKey(ka), "alice's password")
    await make_client(bob).register(BackupKey(kb), "bob's password")
    _, raw_a, key_a = await read_entry(etcd, fleet, alice)
    _, raw_b, key_b = await read_entry(etcd, fleet, bob)
    await etcd.put(key_a, raw_b)
    await etcd.put(key_b, raw_a)
    for user, pw in ((alice, "alice's password"), (bob, "bob's password"), (alice, "bob's password")):
        with pytest.raises(errors.ProtocolError) as failed:
            await make_client(user).recover(pw)
        assert failed.value.code == "record_integrity_failure"
        assert ka.hex() not in str(failed.value) and kb.hex() not in str(failed.value)
    # Nothing was decremented or rewritten by the failed attempts.
    assert (await etcd.get(key_a)).value == raw_b and (await etcd.get(key_b)).value == raw_a
    await etcd.put(key_a, raw_a)
    await etcd.put(key_b, raw_b)
    assert (await make_client(alice).recover("alice's password")).key.reveal() == ka


async def test_a_record_copied_to_another_island_does_not_open_there(make_client, etcd, fleet):
    user = unique_user()
    await make_client(user).register(BackupKey(os.urandom(32)), PW)
    home = rendezvous(user, fleet.spec.islands)
    other = next(i for i in fleet.spec.islands if i != home)
    entry, _, _ = await read_entry(etcd, fleet, user)
    # Ask the HSM to open it as if it lived on the other island: the AAD names the home island.
    hsm = f"http://127.0.0.1:{fleet.procs['hsm-proxy0'].port}"
    body = hapi.LoginStartIn(user_id=user, island=other, request_id=os.urandom(16), current=entry, credential_request=b"\x00" * 96)
    resp = httpx.post(hsm + "/hsm/v1/login/start", content=body.model_dump_json(),
                      headers={"content-type": "application/json"})
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "record_integrity_failure"
