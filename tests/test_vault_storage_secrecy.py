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


async def test_swapping_two_users_sealed_records_in_etcd_is_not_obeyed(make_client, etcd, fleet):
    """The island acts on what the HSM-held log proves, not on what etcd says
    (issue #17): each user still recovers only their own key, and a replica
    that re-reads etcd finds the records do not add up to the log and fails
    closed (tests/test_hsm_boundary_attacks.py)."""
    alice, bob = _same_island_pair(fleet)
    ka, kb = os.urandom(32), os.urandom(32)
    await make_client(alice).register(BackupKey(ka), "alice's password")
    await make_client(bob).register(BackupKey(kb), "bob's password")
    _, raw_a, key_a = await read_entry(etcd, fleet, alice)
    _, raw_b, key_b = await read_entry(etcd, fleet, bob)
    await etcd.put(key_a, raw_b)
    await etcd.put(key_b, raw_a)
    with pytest.raises(errors.WrongPassword):
        await make_client(alice).recover("bob's password")
    assert (await make_client(alice).recover("alice's password")).key.reveal() == ka
    assert (await make_client(bob).recover("bob's password")).key.reveal() == kb
    # Each recovery wrote its record again from the log: etcd adds up once more
    # (the session's other tests share this fleet).
    assert (await etcd.get(key_a)).value != raw_b and (await etcd.get(key_b)).value != raw_a


async def test_an_entry_not_in_an_islands_log_is_refused_by_the_hsm(make_client, etcd, fleet):
    from bkv_island.hsm_client import HsmHttpClient
    from bkv_island.ledger import Ledger

    user = unique_user()
    await make_client(user).register(BackupKey(os.urandom(32)), PW)
    home = rendezvous(user, fleet.spec.islands)
    other = next(i for i in fleet.spec.islands if i != home)
    entry, _, _ = await read_entry(etcd, fleet, user)
    # Shown to the HSM as if it lived on the other island: that island's log says it does not.
    hsm = HsmHttpClient([f"http://127.0.0.1:{fleet.ports.hsm_proxy(0)}"])
    ledger = Ledger(other, etcd, "/bkv", hsm)
    await ledger.load()
    ref = __import__("bkv_protocol.encoding", fromlist=["user_ref"]).user_ref(user)
    out = await hsm.apply(hapi.ApplyIn(head=ledger.head, ops=[hapi.Op(
            kind=hapi.OpKind.RECOVER_START, proof=ledger.trie.prove(bytes.fromhex(ref)).to_bytes(),
            recover_start=hapi.RecoverStartIn(user_id=user, island=other, request_id=os.urandom(16), current=entry,
                                          credential_request=b"\x00" * 96))]))
    assert out.entry is None and out.results[0].error.code.value == "proof_refused"
    await hsm.aclose()
