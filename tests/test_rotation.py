"""Rotating the fleet keys under load (docs/ota.md): a new fleet comes up in
the token, a bundle lists both, every record is re-sealed for the new fleet
while clients on the old one keep working, and the old fleet is retired --
without losing a record or an attempt count."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from bkv import errors
from bkv.sdk import VaultClient
from bkv_protocol.encoding import b64d
from bkv_server.etcd import connect
from bkv_protocol.retry import Backoff
from bkv_dev.fleet import start_fleet
from test_faults import LIMIT, Ledger, audit, load, seed
from support import procs


@pytest.fixture(scope="module")
def rot_fleet(tmp_path_factory):
    f = start_fleet(tmp_path_factory.mktemp("rotation"), replicas_per_island=2)
    yield f
    f.down()


def hsm_admin(fleet, *args: str) -> str:
    _, user_pin = fleet._pins()
    env = {**os.environ, **fleet._softhsm_env(), "BKV_ENV": "dev", "BKV_HSM_TOKEN_LABEL": "bkv-fleet",
           "BKV_HSM_USER_PIN": user_pin, "BKV_HSM_ETCD_ENDPOINTS": fleet.etcd_endpoints}
    res = procs.run([sys.executable, "-m", "bkv_hsm_proxy", *args], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def publish(fleet, *params_files) -> None:
    args = ["publish-bundle", "--operator-key", str(fleet.state / "ota" / "operator.key"),
            "--witness-url", fleet.witness_url, "--etcd-endpoints", fleet.etcd_endpoints]
    for p in params_files:
        args += ["--fleet-params", str(p), "--edge-public-key", fleet.edge_public_key]
    hsm_admin(fleet, *args)


def pinned(fleet, user: str, fleet_key: bytes) -> VaultClient:
    return VaultClient(fleet.frontend_url, fleet_key, user, fleet.issuer().mint(user),
                       backoff=Backoff(deadline_s=20.0, first_delay_s=0.05))


async def live_entries(fleet) -> list[dict]:
    client = await connect(fleet.etcd_endpoints)
    try:
        entries = [json.loads(kv.value) for kv in await client.get_prefix(b"/bkv/records/")]
        return [e for e in entries if e["state"] == "live"]
    finally:
        await client.close()


async def test_rotation_under_load_loses_no_record_and_no_attempt_count(rot_fleet):
    fleet = rot_fleet
    old_params = fleet.state / "fleet-params.json"
    old_key = b64d(fleet.fleet_params["fleet_public_key"])
    old_id = fleet.fleet_params["fleet_id"]
    ledger = Ledger()
    users = await seed(fleet, ledger, 40, "rot")
    dented = users[:10]

    async def dent(u: str) -> None:
        async with pinned(fleet, u, old_key) as c:
            for _ in range(3):
                with pytest.raises(errors.WrongPassword):
                    await c.recover("wrong")

    await asyncio.gather(*(dent(u) for u in dented))
    guessers, honest = users[10:16], users[16:20]
    stop = asyncio.Event()
    # Old clients keep guessing and recovering through the whole rotation.
    task = asyncio.create_task(load(fleet, ledger, guessers, honest, stop))

    # 1. A new fleet inside the token; the bundle lists both, the new one first.
    new_params = fleet.state / "fleet-params-new.json"
    await asyncio.to_thread(hsm_admin, fleet, "fleet-init", "--new-generation", "--out", str(new_params))
    new = json.loads(new_params.read_text())
    new_key, new_id = b64d(new["fleet_public_key"]), new["fleet_id"]
    assert new_id != old_id
    await asyncio.to_thread(publish, fleet, new_params, old_params)

    # 2. A client of the new fleet is served at once, even for records still sealed by the old one.
    # (Users outside the load: two recoveries of one user at once supersede each other.)
    quiet = users[20:]
    async with pinned(fleet, quiet[0], new_key) as c:
        assert (await c.recover("pw-" + quiet[0])).key == ledger.keys[quiet[0]]

    # 3. Every record moves to the new fleet while the load goes on.
    res = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bkv_island", "migrate-fleet", new_id],
        env={**os.environ, "BKV_ISLAND_ETCD_ENDPOINTS": fleet.etcd_endpoints}, capture_output=True, text=True,
        timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["scanned"] >= len(users)
    # Clients of the old fleet still work during the overlap.
    async with pinned(fleet, quiet[1], old_key) as c:
        assert (await c.recover("pw-" + quiet[1])).key == ledger.keys[quiet[1]]
    stop.set()
    await task
    assert {e["fleet_id"] for e in await live_entries(fleet)} == {new_id}

    # Attempt counts moved with the records (checked first: the audit's recoveries reset them).
    for u in dented:
        async with pinned(fleet, u, new_key) as c:
            with pytest.raises(errors.WrongPassword) as wrong:
                await c.recover("wrong")
        assert wrong.value.attempts_left == LIMIT - 3 - 1, u
        ledger.told_wrong[u] = ledger.told_wrong.get(u, 0) + 1
    # Nothing lost, and no user's count moved except by the guesses clients were told about.
    lost, worst = await audit(fleet, ledger, guessers)
    assert lost == 0 and worst <= LIMIT

    # 4. After the overlap: a bundle with only the new fleet, and the old one's keys destroyed.
    await asyncio.to_thread(publish, fleet, new_params)
    out = json.loads(await asyncio.to_thread(hsm_admin, fleet, "retire-fleet", old_id))
    assert out == {"retired": old_id, "fleet_id": new_id}
    async with pinned(fleet, users[-1], old_key) as c:
        with pytest.raises(errors.ProtocolError, match="retired|no fleet"):
            await c.recover("pw-" + users[-1])
    for u in quiet:
        async with pinned(fleet, u, new_key) as c:
            assert (await c.recover("pw-" + u)).key == ledger.keys[u]


def test_a_fleet_that_still_seals_records_is_not_retired(rot_fleet, tmp_path):
    """Runs after the rotation: the only fleet left cannot be retired either."""
    _, user_pin = rot_fleet._pins()
    env = {**os.environ, **rot_fleet._softhsm_env(), "BKV_ENV": "dev", "BKV_HSM_TOKEN_LABEL": "bkv-fleet",
           "BKV_HSM_USER_PIN": user_pin, "BKV_HSM_ETCD_ENDPOINTS": rot_fleet.etcd_endpoints}
    current = json.loads((rot_fleet.state / "fleet-params-new.json").read_text())["fleet_id"]
    res = procs.run([sys.executable, "-m", "bkv_hsm_proxy", "retire-fleet", current], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "only fleet" in res.stderr


# -- an on-path attacker withholds the newest bundle --------------------------------------------

class FakeClock:
    """The device's clock (unix seconds); only the test moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def device_config(fleet, edge_url: str, user: str):
    """A device that pins only the two roots and reaches the vault through ``edge_url``."""
    import base64

    from bkv.config import ClientConfig
    from bkv_protocol.noise import StaticKey

    device = StaticKey.generate()
    operator_root, witness_root = fleet.root_public_keys()
    token = fleet.issuer().mint(user, device_key_b64=base64.b64encode(device.public).decode())
    return ClientConfig(url=edge_url, fleet_public_key="", user_id=user, token=token, edge_url=edge_url,
                        device_key=base64.b64encode(device.reveal()).decode(), operator_root=operator_root,
                        witness_root=witness_root)


async def test_a_client_whose_newest_bundle_is_withheld_keeps_working_only_until_its_max_age(
        rot_fleet, tmp_path, monkeypatch):
    """After a rotation (say, a fleet key compromise), something on the path forges a 404 for
    /v1/bundle or serves an older validly signed bundle. The device keeps using its cached
    bundle while it is fresh, then refuses -- sending nothing -- instead of staying on old
    fleet keys for the fleets' year."""
    import time

    import httpx

    from bkv_protocol import bundle as bd
    from bkv_protocol.secrets import BackupKey
    from support.onpath import OnPath

    fleet = rot_fleet
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "device"))
    withhold: dict[str, object] = {"with": None}  # None (pass), "404", or the bytes of an older bundle

    def on_path(method, path, body, forward):
        if method == "GET" and path == "/v1/bundle" and withhold["with"] == "404":
            return 404, {"content-type": "application/json"}, b'{"error": {"code": "not_found"}}'
        if method == "GET" and path == "/v1/bundle" and isinstance(withhold["with"], bytes):
            return 200, {"content-type": "application/json"}, withhold["with"]
        return forward()

    clock = FakeClock(time.time())
    user, key = f"withheld-{os.urandom(4).hex()}", BackupKey(os.urandom(32))
    with OnPath(fleet.edge_url, on_path) as box:
        cfg = device_config(fleet, box.url, user)
        async with cfg.client(clock=clock) as phone:
            await phone.register(key, "pw")
        cache = cfg.bundle_cache()
        cached = bd.SignedBundle.from_json(cache.read_text()).bundle
        # The operator publishes a newer bundle; the attacker withholds it from now on.
        await asyncio.to_thread(hsm_admin, fleet, "resign-bundle", "--operator-key",
                                str(fleet.state / "ota" / "operator.key"), "--witness-url", fleet.witness_url,
                                "--etcd-endpoints", fleet.etcd_endpoints)
        oldest = httpx.get(f"{fleet.witness_url}/witness/v1/log").json()["entries"][0].encode()
        stale_at = cached.issued_at + 7 * 86400  # the default bundle_max_age_days
        for attack in ("404", oldest):
            withhold["with"] = attack
            clock.now = stale_at - 60
            async with cfg.client(clock=clock) as phone:
                assert (await phone.recover("pw")).key == key
            assert bd.SignedBundle.from_json(cache.read_text()).bundle == cached
            clock.now = stale_at
            before = len(box.seen)
            with pytest.raises(errors.StaleBundle, match="bundle_max_age_days") as refused:
                cfg.client(clock=clock)
            assert "Nothing was sent" in str(refused.value) and "operator" in str(refused.value)
            assert box.seen[before:] == [("GET", "/v1/bundle")]  # no Noise handshake, no request
        # Off the attacker's path, the device takes the newer bundle at once.
        withhold["with"] = None
        clock.now = time.time()
        async with cfg.client(clock=clock) as phone:
            assert (await phone.recover("pw")).key == key
        newest = bd.SignedBundle.from_json(cache.read_text()).bundle
        assert newest.sequence == cached.sequence + 1 and newest.fleets == cached.fleets
