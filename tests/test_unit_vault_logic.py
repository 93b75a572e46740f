"""Unit tests of the vault and island logic with in-memory fakes (no etcd
process, no token): expiry, single use, the one wrong-password error, and the
island's log -- replicas racing, writes whose answer was lost, resends. The
HSM logic and the log's rules are the real ones (VaultHsm, IslandLog, the
trie, a real state file); the same through real processes: the fleet tests."""

from __future__ import annotations

import asyncio
import os

import aetcd
import opaque_ke_py as opaque
import pytest

from bkv_hsm_proxy.core import VaultHsm
from bkv_hsm_proxy.nvram import StateFile
from bkv_island import errors as ierr
from bkv_island.core import Island
from bkv_island.ledger import Ledger
from bkv_protocol import hsm_api as hapi
from bkv_protocol import island_api as iapi
from bkv_protocol.encoding import user_ref
from bkv_server import metrics
from bkv_server.http import UpstreamError
from fakes import FakeClock, InMemoryEtcdFake, InMemoryHsmFake, InProcessHsmFake, with_island_set

RECORDS = b"/bkv/records/island-a/"


@pytest.fixture
def parts(tmp_path):
    hsm = InMemoryHsmFake()
    VaultHsm.create_opaque_setup(hsm)
    hsm.admin = with_island_set(hsm)  # one island: every user's home; the admin key signs the next sets
    clock = FakeClock()
    vault = VaultHsm(hsm, max_attempts=3, clock=clock)
    state = StateFile(tmp_path / "state")
    state.load()
    vault.attach_log(state, "hsm-0", ["hsm-0"])
    etcd = InMemoryEtcdFake()
    return vault, replica(vault, etcd), etcd, clock


def replica(vault: VaultHsm, etcd: InMemoryEtcdFake, port: InProcessHsmFake | None = None) -> Island:
    """One island replica: its own ledger (view of the log), the shared etcd and hsm-proxy."""
    port = port or InProcessHsmFake(vault)
    return Island("island-a", Ledger("island-a", etcd, "/bkv", port), port)


def records(etcd: InMemoryEtcdFake) -> dict[bytes, bytes]:
    return {k: v for k, (v, _) in etcd.kv.items() if k.startswith(RECORDS)}


def entry(etcd: InMemoryEtcdFake, user: str) -> hapi.Entry:
    return hapi.Entry.model_validate_json(etcd.kv[RECORDS + user_ref(user).encode()][0])


def refused(exc_info) -> str:
    return exc_info.value.body.error.code.value


async def _register(island: Island, user: str, pw: bytes = b"pw"):
    start = opaque.client_registration_start(pw)
    out = await island.registration_start(iapi.RegistrationStartIn(user_id=user,
                                                                   registration_request=start.get_message()))
    fin = opaque.client_registration_finish(pw, start.get_state(), out.registration_response)
    return out, fin, iapi.RegistrationFinishIn(user_id=user, request_id=os.urandom(16), challenge=out.challenge,
                                               registration_upload=fin.get_message(), ek=os.urandom(48),
                                               k_nonce=os.urandom(12))


async def _registered(island: Island, user: str) -> None:
    _, _, finish = await _register(island, user)
    await island.registration_finish(finish)


def _guess(user: str, pw: bytes, request_id: bytes | None = None) -> iapi.RecoverStartIn:
    return iapi.RecoverStartIn(user_id=user, request_id=request_id or os.urandom(16),
                             credential_request=opaque.client_login_start(pw).get_message())


async def test_a_challenge_older_than_its_ttl_is_rejected_with_the_fake_clock(parts):
    vault, island, etcd, clock = parts
    _, _, finish = await _register(island, "alice")
    clock.ms += 120_001
    with pytest.raises(UpstreamError, match="expired") as failed:
        await island.registration_finish(finish)
    assert refused(failed) == "challenge_rejected" and records(etcd) == {}


async def test_a_login_state_older_than_its_ttl_is_rejected_and_the_record_is_kept(parts):
    vault, island, etcd, clock = parts
    await _registered(island, "alice")
    login = opaque.client_login_start(b"pw")
    out = await island.recover_start(iapi.RecoverStartIn(user_id="alice", request_id=os.urandom(16), credential_request=login.get_message()))
    fin = opaque.client_login_finish(b"pw", login.get_state(), out.credential_response)
    clock.ms += 60_001
    before = records(etcd)
    with pytest.raises(UpstreamError, match="expired") as failed:
        await island.recover_finish(iapi.RecoverFinishIn(user_id="alice", request_id=os.urandom(16), login_state=out.login_state,
                                                           credential_finalization=fin.get_message()))
    assert refused(failed) == "login_state_rejected" and records(etcd) == before


async def test_a_forged_finalization_is_the_one_uniform_authentication_failure(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    login = opaque.client_login_start(b"pw")
    out = await island.recover_start(iapi.RecoverStartIn(user_id="alice", request_id=os.urandom(16), credential_request=login.get_message()))
    with pytest.raises(UpstreamError) as failed:
        await island.recover_finish(iapi.RecoverFinishIn(user_id="alice", request_id=os.urandom(16), login_state=out.login_state,
                                                           credential_finalization=os.urandom(64)))
    assert refused(failed) == "authentication_failed" and failed.value.body.error.message == "authentication failed"


async def test_concurrent_guesses_through_two_replicas_are_counted_exactly(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    port = InProcessHsmFake(vault)
    replicas = [replica(vault, etcd, port), replica(vault, etcd, port)]

    async def guess(i: int):
        login = opaque.client_login_start(b"wrong")
        try:
            return await replicas[i % 2].recover_start(iapi.RecoverStartIn(
                user_id="alice", request_id=os.urandom(16), credential_request=login.get_message()))
        except Exception as exc:  # noqa: BLE001
            return exc

    results = await asyncio.gather(*(guess(i) for i in range(12)))
    answered = [r for r in results if isinstance(r, iapi.RecoverStartOut)]
    assert sorted(r.attempts_left for r in answered) == [0, 1, 2]
    assert all(isinstance(r, (iapi.RecoverStartOut, ierr.RecordDestroyed)) for r in results), results
    # the replicas did race for the log head: an append lost in etcd, or a head the boundary had seen pass
    assert etcd.lost_txns + port.refused.get("stale_head", 0) >= 1
    assert entry(etcd, "alice").state is hapi.EntryState.DESTROYED


async def test_a_lost_append_releases_nothing_and_the_batch_is_built_again_from_the_newer_log(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    other = replica(vault, etcd)
    real = etcd.transaction
    calls = {"n": 0}

    async def another_replica_appends_first(compare, success, failure):
        calls["n"] += 1
        if calls["n"] == 1:
            etcd.transaction = real  # the other replica's own append goes through
            await other.recover_start(iapi.RecoverStartIn(user_id="alice", request_id=os.urandom(16),
                                                      credential_request=opaque.client_login_start(b"x").get_message()))
            etcd.transaction = another_replica_appends_first
        return await real(compare, success, failure)

    etcd.transaction = another_replica_appends_first
    out = await island.recover_start(iapi.RecoverStartIn(user_id="alice", request_id=os.urandom(16),
                                                     credential_request=opaque.client_login_start(b"pw").get_message()))
    assert out.attempts_left == 1  # 3 - the other replica's guess - ours
    assert calls["n"] == 2 and etcd.lost_txns == 1


async def test_an_append_whose_answer_was_lost_but_that_landed_takes_one_attempt_not_two(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    real = etcd.transaction
    calls = {"n": 0}

    async def lands_but_times_out(**kw):
        calls["n"] += 1
        ok = await real(**kw)
        if calls["n"] == 1:
            raise aetcd.exceptions.ConnectionTimeoutError("etcd answered too late")  # applied, answer lost
        return ok

    etcd.transaction = lands_but_times_out
    out = await island.recover_start(iapi.RecoverStartIn(user_id="alice", request_id=os.urandom(16),
                                                     credential_request=opaque.client_login_start(b"wrong").get_message()))
    assert out.attempts_left == 2 and calls["n"] == 1  # one guess, one attempt, no second evaluation
    out = await island.recover_start(iapi.RecoverStartIn(user_id="alice", request_id=os.urandom(16),
                                                     credential_request=opaque.client_login_start(b"again").get_message()))
    assert out.attempts_left == 1


async def test_an_append_that_did_not_land_is_built_again_once_it_is_known_not_to_have_landed(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    real = etcd.transaction
    calls = {"n": 0}

    async def fails_once(**kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise aetcd.exceptions.ConnectionFailedError("etcd unreachable")  # not applied
        return await real(**kw)

    etcd.transaction = fails_once
    out = await island.recover_start(iapi.RecoverStartIn(user_id="alice", request_id=os.urandom(16),
                                                     credential_request=opaque.client_login_start(b"wrong").get_message()))
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


async def test_a_resent_guess_is_answered_from_the_commit_by_another_replica(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    guess = _guess("alice", b"wrong")
    first = await island.recover_start(guess)
    # Another replica: nothing in memory, only the log and the entry (its kept answer).
    again = await replica(vault, etcd).recover_start(guess)
    assert again == first and first.attempts_left == 2
    current = entry(etcd, "alice")
    assert current.request.id == guess.request_id.hex() and current.version == 2


async def test_a_resend_that_arrives_while_its_request_is_still_running_joins_it_and_is_evaluated_once(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    guess = _guess("alice", b"wrong")
    joined, answered = metrics.RESENDS_JOINED._value.get(), metrics.RESENDS_ANSWERED._value.get()
    # Three copies at once on one replica (a client and a frontend resending while the log is slow).
    answers = await asyncio.gather(*(island.recover_start(guess) for _ in range(3)))
    assert answers[0] == answers[1] == answers[2] and answers[0].attempts_left == 2
    # The two copies waited on the first; none queued a change of its own to be answered from the commit.
    assert metrics.RESENDS_JOINED._value.get() - joined == 2
    assert metrics.RESENDS_ANSWERED._value.get() == answered
    assert entry(etcd, "alice").version == 2  # one decrement, one log change for the three
    assert island._running == {}  # nothing left behind


async def test_a_request_id_reused_with_another_body_while_the_first_runs_is_refused(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    rid = os.urandom(16)
    first, other = (_guess("alice", pw, rid) for pw in (b"wrong", b"other"))
    got = await asyncio.gather(island.recover_start(first), island.recover_start(other), return_exceptions=True)
    assert got[0].attempts_left == 2 and isinstance(got[1], ierr.RequestIdReused)
    assert entry(etcd, "alice").version == 2


async def test_a_change_answered_without_the_boundary_is_decided_on_the_newest_log(parts):
    vault, island, etcd, _ = parts
    other = replica(vault, etcd)
    await other._ledger.ready()  # this replica read the island before alice registered elsewhere
    await _registered(island, "alice")
    # "No record" would be answered without an HSM step: it must not come from the old view.
    guess = opaque.client_login_start(b"pw").get_message()
    out = await other.recover_start(iapi.RecoverStartIn(user_id="alice", request_id=os.urandom(16),
                                                    credential_request=guess))
    assert out.attempts_left == 2 and entry(etcd, "alice").version == 2


# -- compacting the log in etcd ----------------------------------------------------------------
ENTRIES = b"/bkv/log/island-a/entries/"


def log_entries(etcd: InMemoryEtcdFake) -> list[int]:
    return sorted(int(k[len(ENTRIES):]) for k in etcd.kv if k.startswith(ENTRIES))


async def until(predicate, deadline_s: float = 5.0) -> None:
    """Poll (the compaction runs beside the appends) until ``predicate()``, or fail."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not predicate():
        assert loop.time() < end, "not within the deadline"
        await asyncio.sleep(0.01)


class _BehindPort(InProcessHsmFake):
    """An hsm-proxy (of several) that has captured only up to ``index``."""

    def __init__(self, vault, index: int) -> None:
        super().__init__(vault)
        self.index = index

    async def lowest_head(self, island):
        return self.index


async def test_the_log_in_etcd_keeps_the_last_entries_and_a_replica_that_read_it_long_ago_still_works(parts):
    vault, _, etcd, _ = parts
    stale = replica(vault, etcd)
    await _registered(stale, "early")  # this replica's view stops at entry #1
    port = InProcessHsmFake(vault)
    island = Island("island-a", Ledger("island-a", etcd, "/bkv", port, retain=4, compact_every=4), port)
    for i in range(11):
        await _registered(island, f"u{i}")  # entries #2 .. #12; #12 compacts
    await until(lambda: log_entries(etcd)[0] == 8)
    assert log_entries(etcd) == [8, 9, 10, 11, 12]  # 4 behind the head, and the head's own
    assert len(records(etcd)) == 12  # records and head are never compacted
    # The stale replica finds the entries it missed gone: it reads the island whole, and goes on.
    await _registered(stale, "late")
    assert entry(etcd, "late").version == 1 and len(records(etcd)) == 13


async def test_entries_an_hsm_proxy_behind_still_needs_are_kept(parts):
    vault, _, etcd, _ = parts
    port = _BehindPort(vault, index=5)
    island = Island("island-a", Ledger("island-a", etcd, "/bkv", port, retain=4, compact_every=4), port)
    for i in range(12):
        await _registered(island, f"u{i}")
    await until(lambda: log_entries(etcd)[0] == 5)  # not 8: the hsm-proxy at #5 catches up from #6
    port.index = None  # none answers: nothing is compacted
    assert await island._ledger.appender.compact(12) == 0 and log_entries(etcd)[0] == 5
