"""Issue #27 through real processes (etcd, SoftHSM2, hsm-proxy, island,
frontend): wrong guesses wait for the HSM's clock, whoever asks -- the SDK
through the frontend, or an island calling the hsm-proxy directly -- and a
flood at a destroyed record makes one signature. The schedule itself, by a
fake clock: tests/test_unit_guess_delays.py."""

from __future__ import annotations

import datetime
import os

import httpx
import opaque_ke_py as opaque
import pytest

from bkv import errors
from bkv_dev.fleet import start_fleet
from bkv_island.hsm_client import HsmHttpClient
from bkv_island.ledger import Ledger
from bkv_protocol import hsm_api as hapi
from bkv_protocol.encoding import user_ref
from bkv_protocol.secrets import BackupKey
from conftest import unique_user

PW = "correct horse battery staple"
ISLAND = "a"
WAIT_S = 3600  # after every wrong guess: an hour


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """This module's fleet (conftest's ``etcd`` and ``make_client`` use it): one waits an hour after each guess."""
    f = start_fleet(tmp_path_factory.mktemp("delays"), islands=[ISLAND], replicas_per_island=1,
                    guess_delays_s=(WAIT_S,))
    yield f
    f.down()


def counter(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"{name}{{{labels}") or line.startswith(f"{name} "))


async def registered(make_client) -> str:
    user = unique_user("waits")
    await make_client(user).register(BackupKey(os.urandom(32)), PW)
    return user


async def test_the_second_wrong_guess_right_after_the_first_is_too_early_signed_and_spends_nothing(
        fleet, etcd, make_client):
    user = await registered(make_client)
    key = f"/bkv/records/{ISLAND}/{user_ref(user)}".encode()
    thief = make_client(user)
    with pytest.raises(errors.WrongPassword) as wrong:
        await thief.recover("guess one")
    assert wrong.value.attempts_left == 9
    after_one = (await etcd.get(key)).value
    now = datetime.datetime.now(datetime.timezone.utc)
    for guess in ("guess two", PW):  # even the right password waits: it is a guess until evaluated
        with pytest.raises(errors.TooEarly) as early:  # raised only once the fleet's signature verified
            await thief.recover(guess)
        retry_at = early.value.retry_at
        assert now + datetime.timedelta(seconds=WAIT_S - 60) < retry_at < now + datetime.timedelta(
            seconds=WAIT_S + 60)
    assert (await etcd.get(key)).value == after_one  # no decrement, nothing committed


async def test_an_island_that_calls_the_hsm_proxy_directly_before_the_not_before_time_is_refused_and_spends_nothing(
        fleet, etcd, make_client):
    user = await registered(make_client)
    with pytest.raises(errors.WrongPassword):
        await make_client(user).recover("guess one")
    hsm_url = f"http://127.0.0.1:{fleet.ports.hsm_proxy(0)}"
    hsm = HsmHttpClient([hsm_url])
    ledger = Ledger(ISLAND, etcd, "/bkv", hsm)
    await ledger.load()  # what a rogue island sees: the head, the record, its proof
    ref = user_ref(user)
    current, proof = ledger.current(ref), ledger.trie.prove(bytes.fromhex(ref)).to_bytes()
    heads = httpx.get(f"{hsm_url}/hsm/v1/log/heads", timeout=5).json()
    for _ in range(5):  # the limiter skipped: straight to the apply route
        out = await hsm.apply(hapi.ApplyIn(head=ledger.head, ops=[hapi.Op(
            kind=hapi.OpKind.RECOVER_START, proof=proof, recover_start=hapi.RecoverStartIn(
                user_id=user, island=ISLAND, request_id=os.urandom(16), current=current,
                credential_request=opaque.client_login_start(PW.encode()).get_message()))]))
        result = out.results[0]
        assert out.entry is None and result.new_entry is None and result.held is None  # nothing to capture
        assert result.status == 423 and result.error.code.value == "too_early"
        assert result.error.signature and result.error.state.version == current.version
    assert httpx.get(f"{hsm_url}/hsm/v1/log/heads", timeout=5).json() == heads
    await hsm.aclose()


async def test_a_flood_at_a_destroyed_record_makes_one_signature_not_one_per_request(fleet, make_client):
    user = await registered(make_client)
    await make_client(user).disable(PW)  # deleted: a tombstone, refused as record_destroyed
    hsm_url = f"http://127.0.0.1:{fleet.ports.hsm_proxy(0)}"
    island_url = f"http://127.0.0.1:{fleet.ports.island(0, 0)}"
    signed = counter(hsm_url, "bkv_state_answers_total", 'source="signed"')
    remembered = counter(island_url, "bkv_state_answers_total", 'source="remembered"')
    flood = make_client(user)
    for _ in range(30):
        with pytest.raises(errors.LockedOut):  # each one verified by the SDK
            await flood.recover("anything")
    assert counter(hsm_url, "bkv_state_answers_total", 'source="signed"') - signed == 1
    assert counter(island_url, "bkv_state_answers_total", 'source="remembered"') - remembered == 29

