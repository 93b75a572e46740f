"""Unit tests of the vault logic with in-memory fakes (no etcd, no token):
expiry, single use, and the island's compare-and-swap loop."""

from __future__ import annotations

import asyncio
import os

import opaque_ke_py as opaque
import pytest

from bkv_protocol.encoding import user_ref
from bkv_protocol import hsm_api as hapi
from bkv_hsm_proxy import errors as herr
from bkv_hsm_proxy.core import VaultHsm
from bkv_protocol import island_api as iapi
from bkv_island.core import Island
from fakes import FakeClock, InMemoryHsmFake, InMemoryRecordStoreFake, InProcessHsmFake


@pytest.fixture
def parts():
    hsm = InMemoryHsmFake()
    VaultHsm.create_opaque_setup(hsm)
    clock = FakeClock()
    vault = VaultHsm(hsm, max_attempts=3, clock=clock)
    store = InMemoryRecordStoreFake()
    return vault, Island("island-a", store, InProcessHsmFake(vault)), store, clock


async def _register(island: Island, user: str, pw: bytes = b"pw"):
    start = opaque.client_registration_start(pw)
    out = await island.registration_start(iapi.RegistrationStartIn(user_id=user,
                                                                   registration_request=start.get_message()))
    fin = opaque.client_registration_finish(pw, start.get_state(), out.registration_response)
    return out, fin, iapi.RegistrationFinishIn(user_id=user, request_id=os.urandom(16), challenge=out.challenge,
                                               registration_upload=fin.get_message(), ek=os.urandom(48),
                                               k_nonce=os.urandom(12))


async def test_a_challenge_older_than_its_ttl_is_rejected_with_the_fake_clock(parts):
    vault, island, store, clock = parts
    _, _, finish = await _register(island, "alice")
    clock.ms += 120_001
    with pytest.raises(herr.ChallengeRejected, match="expired"):
        await island.registration_finish(finish)
    assert store.data == {}


async def test_a_login_state_older_than_its_ttl_is_rejected_and_the_record_is_kept(parts):
    vault, island, store, clock = parts
    _, _, finish = await _register(island, "alice")
    await island.registration_finish(finish)
    login = opaque.client_login_start(b"pw")
    out = await island.login_start(iapi.LoginStartIn(user_id="alice", request_id=os.urandom(16), credential_request=login.get_message()))
    fin = opaque.client_login_finish(b"pw", login.get_state(), out.credential_response)
    clock.ms += 60_001
    before = dict(store.data)
    with pytest.raises(herr.LoginStateRejected, match="expired"):
        await island.login_finish(iapi.LoginFinishIn(user_id="alice", request_id=os.urandom(16), login_state=out.login_state,
                                                           credential_finalization=fin.get_message()))
    assert store.data == before


async def test_a_forged_finalization_is_the_one_uniform_authentication_failure(parts):
    vault, island, store, _ = parts
    _, _, finish = await _register(island, "alice")
    await island.registration_finish(finish)
    login = opaque.client_login_start(b"pw")
    out = await island.login_start(iapi.LoginStartIn(user_id="alice", request_id=os.urandom(16), credential_request=login.get_message()))
    with pytest.raises(herr.AuthenticationFailed) as failed:
        await island.login_finish(iapi.LoginFinishIn(user_id="alice", request_id=os.urandom(16), login_state=out.login_state,
                                                           credential_finalization=os.urandom(64)))
    assert str(failed.value) == "authentication failed"


async def test_concurrent_guesses_on_the_fake_store_are_counted_exactly(parts):
    vault, island, store, _ = parts
    _, _, finish = await _register(island, "alice")
    await island.registration_finish(finish)

    async def guess():
        login = opaque.client_login_start(b"wrong")
        try:
            return await island.login_start(iapi.LoginStartIn(user_id="alice", request_id=os.urandom(16),
                                                                     credential_request=login.get_message()))
        except Exception as exc:  # noqa: BLE001
            return exc

    results = await asyncio.gather(*(guess() for _ in range(12)))
    answered = [r for r in results if isinstance(r, iapi.LoginStartOut)]
    assert sorted(r.attempts_left for r in answered) == [0, 1, 2]
    assert store.lost_swaps >= 1  # the guesses did race: some read the entry another then changed
    entry, _ = store.data[("island-a", user_ref("alice"))]
    assert entry.state is hapi.EntryState.DESTROYED


async def test_a_lost_compare_and_swap_releases_nothing_and_retries_from_a_fresh_read(parts):
    vault, island, store, _ = parts
    _, _, finish = await _register(island, "alice")
    await island.registration_finish(finish)
    real_swap = store.swap
    calls = {"n": 0}

    async def swap_that_loses_once(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            # Another replica decremented first.
            entry, rev = store.data[("island-a", user_ref("alice"))]
            other = vault.login_start(hapi.LoginStartIn(user_id="alice", island="island-a", request_id=os.urandom(16), current=entry,
                                                        credential_request=opaque.client_login_start(b"x").get_message()))
            await real_swap("island-a", user_ref("alice"), rev, other.new_entry)
        return await real_swap(*args)

    store.swap = swap_that_loses_once
    login = opaque.client_login_start(b"pw")
    out = await island.login_start(iapi.LoginStartIn(user_id="alice", request_id=os.urandom(16), credential_request=login.get_message()))
    assert out.attempts_left == 1  # 3 - the other replica's guess - ours
    assert calls["n"] == 2


async def test_a_write_whose_answer_was_lost_but_that_landed_takes_one_attempt_not_two(parts):
    from bkv_island import errors as ierr

    vault, island, store, _ = parts
    _, _, finish = await _register(island, "alice")
    await island.registration_finish(finish)
    real_swap = store.swap
    calls = {"n": 0}

    async def swap_that_lands_but_times_out(*args):
        calls["n"] += 1
        ok = await real_swap(*args)
        if calls["n"] == 1:
            raise ierr.StoreUnavailable("etcd answered too late")  # applied, answer lost
        return ok

    store.swap = swap_that_lands_but_times_out
    login = opaque.client_login_start(b"wrong")
    out = await island.login_start(iapi.LoginStartIn(user_id="alice", request_id=os.urandom(16), credential_request=login.get_message()))
    assert out.attempts_left == 2 and calls["n"] == 1  # one guess, one attempt, no second evaluation
    entry, _ = store.data[("island-a", user_ref("alice"))]
    login = opaque.client_login_start(b"wrong again")
    out = await island.login_start(iapi.LoginStartIn(user_id="alice", request_id=os.urandom(16), credential_request=login.get_message()))
    assert out.attempts_left == 1


async def test_a_write_that_did_not_land_is_retried_once_it_is_known_not_to_have_landed(parts):
    from bkv_island import errors as ierr

    vault, island, store, _ = parts
    _, _, finish = await _register(island, "alice")
    await island.registration_finish(finish)
    real_swap = store.swap
    calls = {"n": 0}

    async def swap_that_fails_once(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ierr.StoreUnavailable("etcd unreachable")  # not applied
        return await real_swap(*args)

    store.swap = swap_that_fails_once
    login = opaque.client_login_start(b"wrong")
    out = await island.login_start(iapi.LoginStartIn(user_id="alice", request_id=os.urandom(16), credential_request=login.get_message()))
    assert out.attempts_left == 2 and calls["n"] == 2


def test_the_vault_repr_never_shows_the_opaque_setup(parts):
    vault, *_ = parts
    assert "redacted" in repr(vault) and vault._setup.to_bytes().hex() not in repr(vault)


async def test_what_the_hsm_signs_is_what_the_client_verifies_with_the_same_transcript(parts):
    from bkv.sdk import VaultProtocol
    from bkv_protocol import transcripts

    vault, island, _, _ = parts
    _, _, finish = await _register(island, "alice")
    done = await island.registration_finish(finish)
    client = VaultProtocol(vault.public_key_der, "alice")
    request = transcripts.registration_finish_request(None, "alice", finish.request_id, finish.challenge,
                                                      finish.registration_upload, finish.ek, finish.k_nonce)
    client.verify(done.signature, transcripts.registration_finish_answer(
        client.fleet_id, request, done.version, done.max_attempts))
    swapped = transcripts.registration_finish_request(None, "alice", finish.request_id, finish.challenge,
                                                      finish.registration_upload, os.urandom(48), finish.k_nonce)
    with pytest.raises(Exception, match="signature"):
        client.verify(done.signature, transcripts.registration_finish_answer(
            client.fleet_id, swapped, done.version, done.max_attempts))


async def test_a_resent_guess_is_answered_from_the_commit_on_the_fake_store(parts):
    vault, island, store, _ = parts
    _, _, finish = await _register(island, "alice")
    await island.registration_finish(finish)
    guess = iapi.LoginStartIn(user_id="alice", request_id=os.urandom(16),
                                 credential_request=opaque.client_login_start(b"wrong").get_message())
    first = await island.login_start(guess)
    # A second island object stands in for another replica: nothing in memory, only the entry.
    other = Island("island-a", store, InProcessHsmFake(vault))
    store.forget("island-a", user_ref("alice"))
    again = await other.login_start(guess)
    assert again == first and first.attempts_left == 2
    entry, _ = store.data[("island-a", user_ref("alice"))]
    assert entry.request.id == guess.request_id.hex() and entry.version == 2
