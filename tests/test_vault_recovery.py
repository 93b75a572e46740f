"""Register and recover through the real fleet: etcd, SoftHSM2, processes."""

from __future__ import annotations

import os

import pytest

from bkv import errors
from bkv_protocol.secrets import BackupKey
from bkv_protocol.hsm_api import EntryState
from conftest import read_entry, unique_user

PW = "correct horse battery staple"


def new_key() -> BackupKey:
    return BackupKey(os.urandom(32))


async def test_register_then_recover_returns_the_same_key(make_client):
    user, k = unique_user(), new_key()
    reg = await make_client(user).register(k, PW)
    assert (reg.version, reg.max_attempts) == (1, 10)
    rec = await make_client(user).recover(PW)
    assert rec.key == k
    assert rec.record_status == "reset"


async def test_a_new_device_with_no_local_state_recovers_the_key(make_client):
    user, k = unique_user(), new_key()
    old_phone = make_client(user)
    await old_phone.register(k, PW)
    await old_phone.aclose()
    new_phone = make_client(user)  # shares nothing with the old phone but the account and the password
    assert (await new_phone.recover(PW)).key.reveal() == k.reveal()


async def test_a_wrong_password_reports_attempts_left_and_decrements_exactly_once(make_client, etcd, fleet):
    user = unique_user()
    client = make_client(user)
    await client.register(new_key(), PW)
    before, _, _ = await read_entry(etcd, fleet, user)
    with pytest.raises(errors.WrongPassword) as wrong:
        await client.recover("not the password")
    assert wrong.value.attempts_left == 9
    after, _, _ = await read_entry(etcd, fleet, user)
    assert after.version == before.version + 1  # one committed change: the decrement
    with pytest.raises(errors.WrongPassword) as again:
        await client.recover("still not it")
    assert again.value.attempts_left == 8


async def test_a_successful_recovery_resets_the_attempt_count(make_client):
    user = unique_user()
    client = make_client(user)
    await client.register(new_key(), PW)
    for _ in range(3):
        with pytest.raises(errors.WrongPassword):
            await client.recover("wrong")
    await client.recover(PW)
    with pytest.raises(errors.WrongPassword) as wrong:
        await client.recover("wrong")
    assert wrong.value.attempts_left == 9


async def test_ten_wrong_guesses_destroy_the_record_and_the_right_password_then_fails(make_client, etcd, fleet):
    user = unique_user()
    client = make_client(user)
    await client.register(new_key(), PW)
    seen = []
    for i in range(10):
        with pytest.raises(errors.WrongPassword) as wrong:
            await client.recover(f"guess {i}")
        seen.append(wrong.value.attempts_left)
    assert seen == list(range(9, -1, -1))
    entry, raw, _ = await read_entry(etcd, fleet, user)
    assert entry.state is EntryState.DESTROYED and entry.sealed is None
    assert b"sealed" not in raw.replace(b'"sealed":null', b"")
    with pytest.raises(errors.LockedOut):
        await client.recover(PW)


async def test_the_right_password_on_the_last_attempt_returns_the_key_but_the_record_stays_destroyed(make_client):
    user, k = unique_user(), new_key()
    client = make_client(user)
    await client.register(k, PW)
    for i in range(9):
        with pytest.raises(errors.WrongPassword):
            await client.recover(f"guess {i}")
    rec = await client.recover(PW)
    assert rec.key == k and rec.record_status == "destroyed"
    with pytest.raises(errors.LockedOut):
        await client.recover(PW)


async def test_registering_again_after_a_lockout_starts_a_fresh_record(make_client):
    user, k2 = unique_user(), new_key()
    client = make_client(user)
    await client.register(new_key(), PW)
    for i in range(10):
        with pytest.raises(errors.WrongPassword):
            await client.recover(f"guess {i}")
    reg = await client.register(k2, "a new password")
    assert reg.version > 11
    assert (await client.recover("a new password")).key == k2


async def test_recovering_an_account_that_never_registered_says_no_record(make_client):
    with pytest.raises(errors.NoRecord):
        await make_client(unique_user()).recover(PW)


async def test_delete_with_the_recoverys_ticket_destroys_the_record_and_only_once(make_client):
    user = unique_user()
    client = make_client(user)
    await client.register(new_key(), PW)
    ticket = (await client.recover(PW)).ticket
    assert (await client.disable(PW)).version > 0  # recover, then delete with that ticket
    with pytest.raises(errors.LockedOut):  # signed: it was gone already
        await client.delete(ticket)
    with pytest.raises(errors.LockedOut):
        await client.recover(PW)


async def test_fleet_endpoint_publishes_the_public_key_and_never_the_opaque_setup(make_client, fleet):
    info = await make_client(unique_user()).fleet()
    params = fleet.fleet_params
    assert info.fleet_public_key.hex() != "" and info.max_attempts == 10
    from bkv_protocol.encoding import b64d

    assert info.fleet_public_key == b64d(params["fleet_public_key"])
    assert len(info.fleet_public_key) == 91  # a P-256 SubjectPublicKeyInfo, nothing more


def test_the_blocking_client_drives_the_same_protocol(fleet):
    from bkv.sdk import VaultClientSync
    from bkv_protocol.encoding import b64d

    user, k = unique_user(), new_key()
    key = b64d(fleet.fleet_params["fleet_public_key"])
    with VaultClientSync(fleet.frontend_url, key, user, fleet.issuer().mint(user)) as c:
        c.register(k, PW)
        with pytest.raises(errors.WrongPassword) as wrong:
            c.recover("nope")
        assert wrong.value.attempts_left == 9
        assert c.recover(PW).key == k
