"""Issue #17's attacks, from inside the operator's infrastructure, against a
real fleet of its own (etcd, SoftHSM2, hsm-proxy, island, frontend as
processes): whoever can reach the hsm-proxy as an island does, or write
etcd, never gets a CredentialResponse -- or K -- beyond what the log allows.

The same attacks on the log's rules alone, with several hsm-proxies, forks
and rolled-back state files: tests/test_unit_hsm_log.py."""

from __future__ import annotations

import base64
import json
import os

import httpx
import opaque_ke_py as opaque
import pytest

from bkv import errors
from bkv.sdk import VaultClient
from bkv_dev.fleet import start_fleet
from bkv_island.hsm_client import HsmHttpClient
from bkv_island.ledger import Ledger
from bkv_protocol import hsm_api as hapi
from bkv_protocol.encoding import b64d, user_ref
from bkv_protocol.secrets import BackupKey
from bkv_server.etcd import connect
from bkv_server.http import UpstreamError
from conftest import unique_user

PW = "correct horse battery staple"
ISLAND = "a"


@pytest.fixture
def own_fleet(tmp_path_factory):
    """A fleet each test may wreck: one island, one replica, one hsm-proxy."""
    f = start_fleet(tmp_path_factory.mktemp("attacked"), islands=[ISLAND], replicas_per_island=1)
    yield f
    f.down()


@pytest.fixture
async def etcd(own_fleet):
    client = await connect(own_fleet.etcd_endpoints)
    yield client
    await client.close()


def device(fleet, user: str) -> VaultClient:
    return VaultClient(fleet.frontend_url, b64d(fleet.fleet_params["fleet_public_key"]), user,
                       fleet.issuer().mint(user))


def hsm_url(fleet) -> str:
    return f"http://127.0.0.1:{fleet.ports.hsm_proxy(0)}"


async def registered(fleet) -> tuple[str, BackupKey]:
    user, k = unique_user("attacked"), BackupKey(os.urandom(32))
    async with device(fleet, user) as phone:
        await phone.register(k, PW)
    return user, k


async def snapshot(etcd) -> dict[bytes, bytes]:
    """What an insider with etcd access copies: the records and the logs."""
    out = {}
    for prefix in (b"/bkv/records/", b"/bkv/log/"):
        for kv in await etcd.get_prefix(prefix):
            out[kv.key] = kv.value
    return out


async def restore(etcd, snap: dict[bytes, bytes]) -> None:
    for prefix in (b"/bkv/records/", b"/bkv/log/"):
        await etcd.delete_prefix(prefix)
    for key, value in snap.items():
        await etcd.put(key, value)


def restart_island(fleet) -> None:
    """The island re-reads etcd (as a new replica, or one after a crash, would)."""
    fleet.kill(f"{ISLAND}-0")
    fleet.start(f"{ISLAND}-0")


def diverged_count(fleet) -> float:
    text = httpx.get(f"http://127.0.0.1:{fleet.ports.island(0, 0)}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("bkv_log_diverged_total{"))


async def fails_closed(fleet, user: str) -> None:
    """The right password does not bring K back, and the island says why."""
    async with device(fleet, user) as phone:
        with pytest.raises(errors.VaultUnavailable):
            await phone.recover(PW)
    assert diverged_count(fleet) >= 1


async def test_no_route_of_the_hsm_proxy_answers_a_guess_in_clear(own_fleet):
    for path in ("/hsm/v1/recover/start", "/hsm/v1/recover/finish", "/hsm/v1/registration/finish",
                 "/hsm/v1/reseal", "/hsm/v1/migrate"):
        assert httpx.post(hsm_url(own_fleet) + path, json={}, timeout=5).status_code == 404, path


async def test_login_start_applied_thirty_times_to_one_head_releases_at_most_one_credential_response(own_fleet, etcd):
    user, _ = await registered(own_fleet)
    hsm = HsmHttpClient([hsm_url(own_fleet)])
    ledger = Ledger(ISLAND, etcd, "/bkv", hsm)
    await ledger.load()  # what the island sees: the head, the record, its proof
    ref = user_ref(user)
    current, proof = ledger.current(ref), ledger.trie.prove(bytes.fromhex(ref)).to_bytes()
    request = opaque.client_login_start(PW.encode()).get_message()  # the right password
    candidates = []
    for _ in range(30):
        out = await hsm.apply(hapi.ApplyIn(head=ledger.head, ops=[hapi.Op(
            kind=hapi.OpKind.RECOVER_START, proof=proof, recover_start=hapi.RecoverStartIn(
                user_id=user, island=ISLAND, request_id=os.urandom(16), current=current,
                credential_request=request))]))
        assert out.results[0].error is None
        candidates.append((out.entry, out.results[0].held))
    assert len({e.mac for e, _ in candidates}) == 30  # thirty different candidate entries, none released
    for entry, held in candidates:
        with pytest.raises(UpstreamError) as refused:
            await hsm.release(hapi.ReleaseIn(entry=entry, statements=[], held=[held]))
        assert refused.value.body.error.code.value == "no_quorum"
    released = []
    for entry, held in candidates:
        statements = (await hsm.commit([entry], lambda after, upto: _no_chain())).statements
        try:
            released += (await hsm.release(hapi.ReleaseIn(entry=entry, statements=statements, held=[held]))).answers
        except UpstreamError as exc:
            assert exc.body.error.code.value == "no_quorum"
    assert len(released) == 1  # one guess, paid for by one captured decrement
    # That decrement was never appended to etcd: the island finds the boundary
    # ahead of etcd and fails closed rather than forget it.
    restart_island(own_fleet)
    await fails_closed(own_fleet, user)
    await hsm.aclose()


async def _no_chain():
    return []


async def test_one_record_put_back_after_its_attempts_ran_out_is_refused_and_the_newest_state_resumes(
        own_fleet, etcd):
    user, _ = await registered(own_fleet)
    key = f"/bkv/records/{ISLAND}/{user_ref(user)}".encode()
    full = (await etcd.get(key)).value  # ten attempts
    async with device(own_fleet, user) as attacker:
        for left in range(9, -1, -1):
            with pytest.raises(errors.WrongPassword) as wrong:
                await attacker.recover(f"guess {left}")
            assert wrong.value.attempts_left == left
    spent = (await etcd.get(key)).value
    await etcd.put(key, full)  # the record as it was, ten attempts
    restart_island(own_fleet)
    await fails_closed(own_fleet, user)
    await etcd.put(key, spent)  # the operator puts the newest state back
    restart_island(own_fleet)
    async with device(own_fleet, user) as phone:
        with pytest.raises(errors.LockedOut):
            await phone.recover(PW)


async def test_the_whole_store_rolled_back_to_a_snapshot_fails_closed_and_the_newest_state_keeps_every_count(
        own_fleet, etcd):
    user, k = await registered(own_fleet)
    async with device(own_fleet, user) as attacker:
        for _ in range(3):
            with pytest.raises(errors.WrongPassword):
                await attacker.recover("wrong")
        old = await snapshot(etcd)  # 7 attempts left
        for _ in range(4):
            with pytest.raises(errors.WrongPassword):
                await attacker.recover("wrong")
    newest = await snapshot(etcd)  # 3 left
    await restore(etcd, old)
    restart_island(own_fleet)
    await fails_closed(own_fleet, user)
    await restore(etcd, newest)
    restart_island(own_fleet)
    async with device(own_fleet, user) as phone:
        with pytest.raises(errors.WrongPassword) as wrong:
            await phone.recover("wrong again")
        assert wrong.value.attempts_left == 2  # 10 - 3 - 4 - 1: nothing reopened
        assert (await phone.recover(PW)).key == k


async def test_two_users_records_swapped_in_etcd_are_refused(own_fleet, etcd):
    (alice, _), (bob, _) = await registered(own_fleet), await registered(own_fleet)
    ka, kb = (f"/bkv/records/{ISLAND}/{user_ref(u)}".encode() for u in (alice, bob))
    va, vb = (await etcd.get(ka)).value, (await etcd.get(kb)).value
    await etcd.put(ka, vb)
    await etcd.put(kb, va)
    restart_island(own_fleet)
    await fails_closed(own_fleet, alice)


async def test_a_registration_replayed_after_guesses_gives_no_attempts_back(own_fleet):
    user, _ = await registered(own_fleet)
    sent = []

    class Keep(httpx.AsyncBaseTransport):
        def __init__(self):
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request):
            if request.url.path == "/v1/registration/finish":
                sent.append(request.content)
            return await self.inner.handle_async_request(request)

    other = unique_user("replay")
    async with VaultClient(own_fleet.frontend_url, b64d(own_fleet.fleet_params["fleet_public_key"]), other,
                           own_fleet.issuer().mint(other), transport=Keep()) as phone:
        await phone.register(BackupKey(os.urandom(32)), PW)
        for _ in range(4):
            with pytest.raises(errors.WrongPassword):
                await phone.recover("wrong")
    token = own_fleet.issuer().mint(other)
    body = json.loads(sent[-1])
    fresh_id = {**body, "request_id": base64.b64encode(os.urandom(16)).decode()}
    for replayed, code in ((body, "request_superseded"), (fresh_id, "challenge_rejected")):
        # the same request: answered before, changes since; a new id: the challenge's version is spent
        answer = httpx.post(own_fleet.frontend_url + "/v1/registration/finish", json=replayed, timeout=10,
                            headers={"authorization": f"Bearer {token}"})
        assert answer.json()["error"]["code"] == code, answer.text
    async with device(own_fleet, other) as phone:
        with pytest.raises(errors.WrongPassword) as wrong:
            await phone.recover("wrong")
        assert wrong.value.attempts_left == 5
