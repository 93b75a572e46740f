"""etcd or hsm-proxy unreachable: 503 with retry advice, no partial writes;
the client's retries succeed once the part is back. Uses a fleet of its
own because it kills parts of it."""

from __future__ import annotations

import base64
import os
import signal

import httpx
import pytest
from opaque_ke_py import client_login_start

from bkv import errors
from bkv.sdk import VaultClient
from bkv_protocol.encoding import b64d
from bkv_protocol.retry import Backoff
from bkv_protocol.secrets import BackupKey
from bkv_dev.fleet import start_fleet
from conftest import unique_user

PW = "faulty but fine"


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory):
    f = start_fleet(tmp_path_factory.mktemp("faults"), islands=["island-a"], replicas_per_island=2, hsm_proxies=3)
    yield f
    f.down()


def client(fleet, user, deadline_s=15.0) -> VaultClient:
    return VaultClient(fleet.frontend_url, b64d(fleet.fleet_params["fleet_public_key"]), user,
                       fleet.issuer().mint(user), backoff=Backoff(deadline_s=deadline_s, first_delay_s=0.05))


async def test_with_every_hsm_proxy_down_the_vault_answers_503_and_writes_nothing(small_fleet):
    user = unique_user()
    async with client(small_fleet, user) as c:
        await c.register(BackupKey(os.urandom(32)), PW)
    for name in ("hsm-proxy0", "hsm-proxy1", "hsm-proxy2"):
        small_fleet.kill(name)
    try:
        token = small_fleet.issuer().mint(user)
        req = client_login_start(b"x").get_message()
        resp = httpx.post(small_fleet.frontend_url + "/v1/recover/start", timeout=30,
                          json={"request_id": base64.b64encode(os.urandom(16)).decode(),
                                "credential_request": base64.b64encode(req).decode()},
                          headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 503
        assert resp.json()["error"] == {"code": "unavailable", "retryable": True,
                                        "message": resp.json()["error"]["message"]}
        assert resp.headers.get("retry-after") == "1"
        async with client(small_fleet, user, deadline_s=1.0) as c:
            with pytest.raises(errors.VaultUnavailable):
                await c.recover("wrong")
    finally:
        for name in ("hsm-proxy0", "hsm-proxy1", "hsm-proxy2"):
            small_fleet.start(name)
    async with client(small_fleet, user) as c:
        with pytest.raises(errors.WrongPassword) as wrong:
            await c.recover("wrong")
    assert wrong.value.attempts_left == 9  # the failed attempts above cost nothing


async def test_one_hsm_proxy_killed_mid_flight_is_invisible_to_clients(small_fleet):
    user = unique_user()
    small_fleet.kill("hsm-proxy0")
    try:
        async with client(small_fleet, user) as c:
            k = BackupKey(os.urandom(32))
            await c.register(k, PW)
            assert (await c.recover(PW)).key == k
    finally:
        small_fleet.start("hsm-proxy0")


async def test_one_island_replica_killed_is_invisible_to_clients(small_fleet):
    user = unique_user()
    small_fleet.kill("island-a-0", signal.SIGKILL)
    try:
        async with client(small_fleet, user) as c:
            k = BackupKey(os.urandom(32))
            await c.register(k, PW)
            assert (await c.recover(PW)).key == k
    finally:
        small_fleet.start("island-a-0")


async def test_with_etcd_down_the_vault_answers_503_and_recovers_when_it_returns(small_fleet):
    user = unique_user()
    k = BackupKey(os.urandom(32))
    async with client(small_fleet, user) as c:
        await c.register(k, PW)
    small_fleet.kill("etcd0")
    try:
        async with client(small_fleet, user, deadline_s=2.0) as c:
            with pytest.raises(errors.VaultUnavailable):
                await c.recover(PW)
    finally:
        small_fleet.start("etcd0", wait=False)
    async with client(small_fleet, user, deadline_s=30.0) as c:
        assert (await c.recover(PW)).key == k
