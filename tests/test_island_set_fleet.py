"""Which island holds a user is not etcd's word (issue #25): against a real
fleet of its own (etcd, SoftHSM2, hsm-proxy, two islands, frontend as
processes), an etcd writer who rewrites the island map so that a user is
routed to the island that truthfully lacks its record gets the device no
signed ``no_record`` -- the boundary checks the admin-signed island set in
its token -- so a new phone makes no new key; once the map is put back the
user recovers its key. The same rules with in-memory fakes:
tests/test_unit_island_set.py."""

from __future__ import annotations

import json
import os
import time

import pytest

from bkv import errors
from bkv.sdk import VaultClient
from bkv_dev.fleet import start_fleet
from bkv_island.store import user_key
from bkv_protocol.encoding import b64d
from bkv_protocol.islands import rendezvous
from bkv_protocol.retry import Backoff
from bkv_protocol.secrets import BackupKey
from bkv_server.etcd import connect
from bkv_server.fleetmap import ISLAND_MAP_KEY
from conftest import unique_user

PW = "correct horse battery staple"
ISLANDS = ["island-a", "island-b"]


@pytest.fixture(scope="module")
def two_islands(tmp_path_factory):
    f = start_fleet(tmp_path_factory.mktemp("island-set"), islands=list(ISLANDS), replicas_per_island=1)
    yield f
    f.down()


@pytest.fixture
async def etcd(two_islands):
    client = await connect(two_islands.etcd_endpoints)
    yield client
    await client.close()


def device(fleet, user: str, deadline_s: float = 15.0) -> VaultClient:
    """A brand-new device (a new phone) for ``user``."""
    return VaultClient(fleet.frontend_url, b64d(fleet.fleet_params["fleet_public_key"]), user,
                       fleet.issuer().mint(user), backoff=Backoff(deadline_s=deadline_s, first_delay_s=0.05))


def user_on(island: str) -> str:
    while True:
        u = unique_user("isl")
        if rendezvous(u, ISLANDS) == island:
            return u


async def write_map(etcd, islands: list[str]) -> None:
    await etcd.put(("/bkv" + ISLAND_MAP_KEY).encode(), json.dumps({"islands": islands}).encode())


async def until_routed(fleet, probe: str, to_wrong_island: bool, deadline_s: float = 30.0) -> None:
    """Poll until the frontend routes by the map just written: ``probe`` (a user with no record, home on the
    island the map leaves out or keeps) gets a signed NoRecord exactly when it is routed to its own island."""
    end = time.monotonic() + deadline_s
    while True:
        async with device(fleet, probe, deadline_s=1.0) as c:
            try:
                await c.recover(PW)
            except errors.NoRecord:
                routed_wrong = False
            except errors.VaultUnavailable:
                routed_wrong = True
        if routed_wrong == to_wrong_island:
            return
        assert time.monotonic() < end, "the frontend never routed by the map written to etcd"


async def test_an_etcd_writer_who_routes_a_user_to_the_island_lacking_its_record_gets_no_signed_no_record(
        two_islands, etcd):
    fleet = two_islands
    user, k = user_on("island-a"), BackupKey(os.urandom(32))
    async with device(fleet, user) as c:
        await c.register(k, PW)
    probe = user_on("island-a")  # no record anywhere: a signed NoRecord on island-a, nothing signed elsewhere
    before = await etcd.get(user_key("/bkv", "island-a", user))
    await write_map(etcd, ["island-b"])  # every user to island-b, which truthfully holds no record of theirs
    try:
        await until_routed(fleet, probe, to_wrong_island=True)
        async with device(fleet, user, deadline_s=5.0) as new_phone:
            with pytest.raises(errors.VaultUnavailable) as refused:
                await new_phone.recover(PW)
        assert not isinstance(refused.value, errors.NoRecord)
        # Nothing was spent or written: the record on island-a is as it was, island-b holds nothing for the user.
        assert (await etcd.get(user_key("/bkv", "island-a", user))).value == before.value
        assert await etcd.get(user_key("/bkv", "island-b", user)) is None
    finally:
        await write_map(etcd, ISLANDS)
    await until_routed(fleet, probe, to_wrong_island=False)
    async with device(fleet, user) as new_phone:
        assert (await new_phone.recover(PW)).key == k


async def test_a_first_backup_routed_by_a_lying_map_makes_no_record_on_the_wrong_island(two_islands, etcd):
    fleet = two_islands
    user, probe = user_on("island-b"), user_on("island-b")
    await write_map(etcd, ["island-a"])
    try:
        await until_routed(fleet, probe, to_wrong_island=True)
        async with device(fleet, user, deadline_s=5.0) as new_phone:
            with pytest.raises(errors.VaultUnavailable):  # what a first backup asks first
                await new_phone.recover(PW)
            with pytest.raises(errors.VaultUnavailable):  # and a registration is not made there either
                await new_phone.register(BackupKey(os.urandom(32)), PW)
        assert await etcd.get(user_key("/bkv", "island-a", user)) is None
    finally:
        await write_map(etcd, ISLANDS)
    await until_routed(fleet, probe, to_wrong_island=False)
    k = BackupKey(os.urandom(32))
    async with device(fleet, user) as c:
        with pytest.raises(errors.NoRecord):  # signed, on its own island
            await c.recover(PW)
        await c.register(k, PW)
    async with device(fleet, user) as new_phone:
        assert (await new_phone.recover(PW)).key == k
    assert await etcd.get(user_key("/bkv", "island-b", user)) is not None
