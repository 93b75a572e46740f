"""Fleet keys over the air, end to end on the real fleet: a client that pins
only the two bundle roots learns the fleet and edge keys from the bundle the
frontend serves, and refuses a bundle one party did not sign or an older one."""

from __future__ import annotations

import asyncio
import base64
import os
import sys

import httpx
import pytest

from bkv import errors
from bkv.config import ClientConfig
from bkv_protocol import bundle as bd
from bkv_protocol.encoding import b64d
from bkv_server.etcd import connect
from bkv_server.fleetmap import FLEET_BUNDLE_KEY
from bkv_protocol.secrets import BackupKey
from bkv_protocol.noise import StaticKey
from support import procs


def roots_only_config(fleet, user: str) -> ClientConfig:
    """What a new device knows: the edge address and the two roots. No fleet key."""
    device = StaticKey.generate()
    operator_root, witness_root = fleet.root_public_keys()
    token = fleet.issuer().mint(user, device_key_b64=base64.b64encode(device.public).decode())
    return ClientConfig(url=fleet.edge_url, fleet_public_key="", user_id=user, token=token,
                        edge_url=fleet.edge_url, device_key=base64.b64encode(device.reveal()).decode(),
                        operator_root=operator_root, witness_root=witness_root)


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    """Each test is a device of its own: its own config dir and bundle cache."""
    def new_device(name: str):
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / name))
    new_device("device-1")
    return new_device


async def etcd_bundle(fleet, value: bytes | None = None) -> bytes:
    client = await connect(fleet.etcd_endpoints)
    try:
        key = ("/bkv" + FLEET_BUNDLE_KEY).encode()
        if value is not None:
            await client.put(key, value)
        return (await client.get(key)).value
    finally:
        await client.close()


async def wait_served(fleet, value: bytes) -> None:
    for _ in range(100):
        if httpx.get(f"{fleet.edge_url}/v1/bundle").content == value:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the frontend never served the new bundle")


def test_the_edge_serves_the_bundle_in_clear_and_nothing_else(fleet):
    res = httpx.get(f"{fleet.edge_url}/v1/bundle")
    assert res.status_code == 200
    signed = bd.SignedBundle.from_json(res.text)
    operator_root, witness_root = (b64d(k) for k in fleet.root_public_keys())
    bd.verify(signed, operator_root, witness_root)
    assert [f.fleet_id for f in signed.bundle.fleets] == [fleet.fleet_params["fleet_id"]]
    assert signed.bundle.fleets[0].edge_public_key == b64d(fleet.edge_public_key)
    # Only that one GET is passed in clear; the API still needs Noise.
    assert httpx.post(f"{fleet.edge_url}/v1/bundle").status_code == 404
    assert httpx.get(f"{fleet.edge_url}/v1/fleet").status_code == 404


async def test_a_client_with_only_the_roots_recovers_a_key_from_a_fleet_it_has_never_seen(fleet, config_home):
    key = BackupKey(os.urandom(32))
    user = f"ota-{os.urandom(4).hex()}"
    async with roots_only_config(fleet, user).client() as phone:
        await phone.register(key, "pass phrase")
    config_home("device-2")  # a new device: no cached bundle either
    async with roots_only_config(fleet, user).client() as new_phone:
        assert (await new_phone.recover("pass phrase")).key == key


async def test_a_bundle_signed_by_only_the_operator_is_refused_by_a_new_client(fleet, config_home, tmp_path):
    good = await etcd_bundle(fleet)
    operator_key = bd.load_root_key(fleet.state / "ota" / "operator.key")
    current = bd.SignedBundle.from_json(good)
    unwitnessed = bd.operator_sign(bd.next_bundle(current, list(current.bundle.fleets)), operator_key)
    try:
        await etcd_bundle(fleet, unwitnessed.to_json().encode())
        await wait_served(fleet, unwitnessed.to_json().encode())
        with pytest.raises(errors.UntrustedFleet, match="witness"):
            roots_only_config(fleet, "nobody").client()
    finally:
        await etcd_bundle(fleet, good)
        await wait_served(fleet, good)


async def test_a_rolled_back_bundle_is_refused_and_the_cached_one_is_used(fleet, config_home):
    first = await etcd_bundle(fleet)
    # The operator publishes bundle n+1 through the witness; the device caches it.
    ota = fleet.state / "ota"
    procs.run([sys.executable, "-m", "bkv_hsm_proxy", "publish-bundle", "--operator-key", str(ota / "operator.key"),
                    "--witness-url", fleet.witness_url, "--fleet-params", str(fleet.state / "fleet-params.json"),
                    "--edge-public-key", fleet.edge_public_key, "--etcd-endpoints", fleet.etcd_endpoints],
                   check=True, capture_output=True)
    newer = await etcd_bundle(fleet)
    await wait_served(fleet, newer)
    user = f"ota-{os.urandom(4).hex()}"
    key = BackupKey(os.urandom(32))
    async with roots_only_config(fleet, user).client() as phone:
        await phone.register(key, "pw")
    cache = roots_only_config(fleet, user).bundle_cache()
    newer_seq = bd.SignedBundle.from_json(newer).bundle.sequence
    assert bd.SignedBundle.from_json(cache.read_text()).bundle.sequence == newer_seq
    try:
        # Someone serves the older (validly signed) bundle: the device keeps the newer one.
        await etcd_bundle(fleet, first)
        await wait_served(fleet, first)
        async with roots_only_config(fleet, user).client() as phone:
            assert (await phone.recover("pw")).key == key
        assert bd.SignedBundle.from_json(cache.read_text()).bundle.sequence == newer_seq
    finally:
        await etcd_bundle(fleet, newer)
        await wait_served(fleet, newer)


def test_deployment_evidence_verifies_and_the_audit_fails_on_any_altered_byte_of_it(fleet, tmp_path):
    """The token's fleet key and the operator sign a statement of the fleet's
    keys, their token attributes and the bundle; `bkv audit` checks it
    against the witness log, byte for byte."""
    from typer.testing import CliRunner

    from bkv.cli import app
    from bkv_protocol import evidence as ev

    bundle_file = tmp_path / "bundle.json"
    bundle_file.write_text(httpx.get(f"{fleet.edge_url}/v1/bundle").text + "\n")
    _, user_pin = fleet._pins()
    env = {**os.environ, **fleet._softhsm_env(), "BKV_ENV": "dev", "BKV_HSM_TOKEN_LABEL": "bkv-fleet",
           "BKV_HSM_USER_PIN": user_pin}
    out = tmp_path / "evidence.json"
    res = procs.run([sys.executable, "-m", "bkv_hsm_proxy", "evidence", "--bundle", str(bundle_file),
                          "--operator-key", str(fleet.state / "ota" / "operator.key"), "--out", str(out)],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    statement = ev.Evidence.from_json(out.read_text()).statement
    assert statement["fleet_id"] == fleet.fleet_params["fleet_id"]
    assert statement["key_attributes"]["signing"] == ev.REQUIRED_ATTRIBUTES == statement["key_attributes"]["sealing"]
    assert statement["token"]["label"] == "bkv-fleet" and statement["software_version"]
    operator_root, witness_root = fleet.root_public_keys()
    args = ["audit", str(bundle_file), "--witness-log", fleet.witness_url, "--operator-root", operator_root,
            "--witness-root", witness_root, "--evidence", str(out)]
    runner = CliRunner()
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0 and "evidence statement(s) verify" in ok.output, ok.output
    original = out.read_bytes()
    try:
        for pos in range(len(original.rstrip(b"\n"))):
            altered = bytearray(original)
            altered[pos] = ord("0") if altered[pos] != ord("0") else ord("1")
            out.write_bytes(bytes(altered))
            assert runner.invoke(app, args).exit_code == 12, (pos, original[max(0, pos - 12):pos + 12])
    finally:
        out.write_bytes(original)
