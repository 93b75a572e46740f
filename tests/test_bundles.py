"""Validation bundles, the witness and the audit (docs/ota.md): a client
trusts a fleet only through a bundle both roots signed, never goes back to
an older one, and a witness never countersigns a fork."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from bkv.cli import app
from bkv.trust import TrustStore
from bkv_protocol import bundle as bd
from bkv_protocol.encoding import b64e, fleet_id_for
from bkv_witness.core import Witness
from bkv_witness.errors import WitnessRefused
from support.onpath import OnPath
from support import procs


def make_fleet(now: int = 1_800_000_000, days: int = 365) -> bd.Fleet:
    der = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bd.Fleet(fleet_id_for(der), der, os.urandom(32), now - 60, now + days * 86400)


@pytest.fixture
def roots():
    return bd.RootKey.generate(), bd.RootKey.generate()


@pytest.fixture
def witness(roots, tmp_path):
    operator, witness_key = roots
    return Witness(witness_key, operator.public, tmp_path / "witness.log", clock=lambda: 1_800_000_000)


def publish(operator, witness, prev, fleets, now=1_800_000_000) -> bd.SignedBundle:
    return witness.countersign(bd.operator_sign(bd.next_bundle(prev, fleets, now), operator))


def test_root_keys_never_show_their_value():
    key = bd.RootKey.generate()
    assert repr(key) == str(key) == "RootKey(redacted)"


def test_a_bundle_signed_by_both_roots_is_accepted_and_names_its_fleets(roots, witness):
    operator, witness_key = roots
    fleet = make_fleet()
    signed = publish(operator, witness, None, [fleet])
    store = TrustStore(operator.public, witness_key.public)
    store.accept(signed.to_json())
    assert store.fleet(fleet.fleet_id, now=1_800_000_000) == fleet
    assert store.fleet(fleet.fleet_id, now=fleet.not_after) is None  # outside its window


def test_a_bundle_signed_by_only_one_party_is_rejected(roots, witness):
    operator, witness_key = roots
    operator_only = bd.operator_sign(bd.next_bundle(None, [make_fleet()]), operator)
    store = TrustStore(operator.public, witness_key.public)
    with pytest.raises(bd.BadBundleSignature) as exc:
        store.accept(operator_only.to_json())
    assert exc.value.party == "witness"
    # The witness's signature on a bundle the operator never signed is worth nothing either.
    forged = bd.SignedBundle(operator_only.bundle, os.urandom(64))
    forged = forged.with_witness(bd.witness_countersign(forged, witness_key))
    with pytest.raises(bd.BadBundleSignature) as exc:
        store.accept(forged.to_json())
    assert exc.value.party == "operator"
    # Roots swapped: each signature must come from its own root.
    swapped = TrustStore(witness_key.public, operator.public)
    with pytest.raises(bd.BadBundleSignature):
        swapped.accept(publish(operator, witness, None, [make_fleet()]).to_json())
    assert store.current is None


def test_a_rolled_back_bundle_is_rejected_even_after_a_restart(roots, witness, tmp_path):
    operator, witness_key = roots
    first = publish(operator, witness, None, [make_fleet()])
    second = publish(operator, witness, first, [make_fleet()])
    cache = tmp_path / "trust" / "bundle.json"
    store = TrustStore(operator.public, witness_key.public, cache)
    store.accept(second.to_json())
    with pytest.raises(bd.BundleRollback):
        store.accept(first.to_json())
    assert store.current == second
    restarted = TrustStore(operator.public, witness_key.public, cache)
    with pytest.raises(bd.BundleRollback):
        restarted.accept(first.to_json())
    assert restarted.current.bundle.sequence == 2


def test_a_tampered_cache_is_not_trusted(roots, witness, tmp_path):
    operator, witness_key = roots
    cache = tmp_path / "bundle.json"
    TrustStore(operator.public, witness_key.public, cache).accept(publish(operator, witness, None,
                                                                          [make_fleet()]).to_json())
    cache.write_text(cache.read_text().replace('"sequence": 1', '"sequence": 9'))
    with pytest.raises(bd.BundleError):
        TrustStore(operator.public, witness_key.public, cache)


# -- freshness ---------------------------------------------------------------------------------

DAY = 86400
T0 = 1_800_000_000


class FakeClock:
    """Unix seconds that only the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_bundle_is_used_only_until_the_clients_max_age_and_a_resigned_one_renews_it(roots, tmp_path):
    operator, witness_key = roots
    clock = FakeClock(T0)
    witness = Witness(witness_key, operator.public, tmp_path / "witness.log", clock=clock)
    first = publish(operator, witness, None, [make_fleet()], now=T0)
    fleet = first.bundle.fleets[0]
    assert first.bundle.expires_at == T0 + bd.DEFAULT_VALIDITY_S
    cache = tmp_path / "bundle.json"
    store = TrustStore(operator.public, witness_key.public, cache, max_age_s=7 * DAY, clock=clock)
    store.accept(first.to_json())
    clock.now = T0 + 7 * DAY - 1
    assert store.fleet(fleet.fleet_id) == fleet
    clock.now = T0 + 7 * DAY
    assert store.fleet(fleet.fleet_id) is None and store.valid_fleets() == []
    with pytest.raises(bd.BundleStale, match="stopped being usable"):
        store.require_fresh()
    # A restart does not make the cached bundle fresh again.
    assert TrustStore(operator.public, witness_key.public, cache, clock=clock).valid_fleets() == []
    # The operator re-signs the same fleets: a newer bundle, fresh again.
    resigned = publish(operator, witness, first, list(first.bundle.fleets), now=int(clock.now))
    store.accept(resigned.to_json())
    assert store.fleet(fleet.fleet_id) == fleet and store.current.bundle.sequence == 2
    # The older bundle still never replaces it.
    with pytest.raises(bd.BundleRollback):
        store.accept(first.to_json())


def test_the_sooner_of_the_signed_expiry_and_the_clients_max_age_ends_a_bundle(roots, tmp_path):
    operator, witness_key = roots
    clock = FakeClock(T0)
    witness = Witness(witness_key, operator.public, tmp_path / "witness.log", clock=clock)
    one_day = witness.countersign(bd.operator_sign(bd.next_bundle(None, [make_fleet()], T0, valid_for_s=DAY),
                                                   operator))
    lenient = TrustStore(operator.public, witness_key.public, max_age_s=30 * DAY, clock=clock)
    lenient.accept(one_day.to_json())
    clock.now = T0 + DAY - 1
    assert lenient.valid_fleets()
    clock.now = T0 + DAY  # the operator's expiry, though the client would allow 30 days
    assert lenient.valid_fleets() == []
    strict = TrustStore(operator.public, witness_key.public, max_age_s=3600, clock=FakeClock(T0 + 3600))
    strict.accept(one_day.to_json())  # adopted (it is the newest), but not used
    assert strict.current == one_day and strict.valid_fleets() == []
    with pytest.raises(ValueError):
        TrustStore(operator.public, witness_key.public, max_age_s=0)


def test_the_expiry_is_signed_and_a_format_1_bundle_without_one_is_refused(roots, witness, tmp_path):
    operator, witness_key = roots
    signed = publish(operator, witness, None, [make_fleet()])
    longer = signed.to_json().replace(f'"expires_at": {signed.bundle.expires_at}',
                                      f'"expires_at": {signed.bundle.expires_at + 365 * DAY}')
    assert longer != signed.to_json()
    with pytest.raises(bd.BadBundleSignature):
        TrustStore(operator.public, witness_key.public).accept(longer)
    old_format = signed.to_json().replace('"format_version": 2', '"format_version": 1')
    with pytest.raises(bd.MalformedBundle, match="format 1"):
        bd.SignedBundle.from_json(old_format)
    # A cache an older client wrote is set aside (it could never be used), not a crash.
    cache = tmp_path / "bundle.json"
    cache.write_text(old_format)
    assert TrustStore(operator.public, witness_key.public, cache).current is None
    with pytest.raises(bd.MalformedBundle, match="expires after"):
        bd.operator_sign(bd.Bundle(1, bd.GENESIS, T0, T0, (make_fleet(),)), operator)


def test_the_witness_refuses_a_bundle_issued_before_the_last_one_or_in_the_future(roots, witness):
    operator, _ = roots
    first = publish(operator, witness, None, [make_fleet()], now=T0)
    earlier = bd.operator_sign(bd.next_bundle(first, [make_fleet()], T0 - 1), operator)
    with pytest.raises(WitnessRefused, match="issued before"):
        witness.countersign(earlier)
    future = bd.operator_sign(bd.next_bundle(first, [make_fleet()], T0 + 3600), operator)
    with pytest.raises(WitnessRefused, match="future"):
        witness.countersign(future)
    assert len(witness.log()) == 1


def test_the_witness_refuses_a_fork_a_gap_and_an_unsigned_bundle(roots, witness):
    operator, _ = roots
    first = publish(operator, witness, None, [make_fleet()])
    fork = bd.operator_sign(bd.next_bundle(None, [make_fleet()]), operator)  # another bundle 1
    with pytest.raises(WitnessRefused, match="fork"):
        witness.countersign(fork)
    gap = bd.operator_sign(bd.Bundle(3, bd.bundle_hash(first.bundle), 1_800_000_000, 1_800_086_400,
                                     (make_fleet(),)), operator)
    with pytest.raises(WitnessRefused, match="does not extend"):
        witness.countersign(gap)
    stranger = bd.operator_sign(bd.next_bundle(first, [make_fleet()]), bd.RootKey.generate())
    with pytest.raises(WitnessRefused):
        witness.countersign(stranger)
    # The same bundle again gets the same countersignature; the log holds one entry.
    again = witness.countersign(bd.SignedBundle(first.bundle, first.operator_signature))
    assert again.witness_signature == first.witness_signature and len(witness.log()) == 1


def test_a_malformed_bundle_is_refused_before_any_signature_check(roots):
    operator, _ = roots
    fleet = make_fleet()
    wrong_id = bd.Fleet("0" * 32, fleet.fleet_public_key, fleet.edge_public_key, fleet.not_before, fleet.not_after)
    with pytest.raises(bd.MalformedBundle):
        bd.operator_sign(bd.next_bundle(None, [wrong_id]), operator)
    with pytest.raises(bd.MalformedBundle):
        bd.SignedBundle.from_json('{"bundle": {"sequence": -1}}')


# -- the witness as a real process --------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def witness_process(roots, tmp_path):
    operator, _ = roots
    out = procs.run([sys.executable, "-m", "bkv_witness", "keygen", "--out", str(tmp_path / "w.key")],
                         capture_output=True, text=True, check=True)
    port = _free_port()
    env = {**os.environ, "BKV_WITNESS_PORT": str(port), "BKV_WITNESS_KEY_FILE": str(tmp_path / "w.key"),
           "BKV_WITNESS_OPERATOR_PUBLIC_KEY": b64e(operator.public),
           "BKV_WITNESS_LOG_FILE": str(tmp_path / "witness.log")}
    proc = procs.spawn([sys.executable, "-m", "bkv_witness", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the witness did not start"
        time.sleep(0.1)
    yield url, out.stdout.strip(), tmp_path / "witness.log"
    procs.stop(proc)


def test_a_witness_process_countersigns_a_chain_refuses_a_fork_and_serves_its_log(roots, witness_process):
    operator, _ = roots
    url, witness_public_b64, _ = witness_process
    assert httpx.get(f"{url}/witness/v1/public-key").json()["witness_public_key"] == witness_public_b64
    prev = None
    for _ in range(2):
        signed = bd.operator_sign(bd.next_bundle(prev, [make_fleet()]), operator)
        res = httpx.post(f"{url}/witness/v1/countersign", json={"bundle": signed.to_json()})
        assert res.status_code == 200, res.text
        prev = signed.with_witness(bd.b64d(res.json()["witness_signature"]))
    fork = bd.operator_sign(bd.next_bundle(None, [make_fleet()]), operator)
    res = httpx.post(f"{url}/witness/v1/countersign", json={"bundle": fork.to_json()})
    assert res.status_code == 409 and "fork" in res.json()["error"]["message"]
    entries = httpx.get(f"{url}/witness/v1/log").json()["entries"]
    assert [bd.SignedBundle.from_json(e).bundle.sequence for e in entries] == [1, 2]
    store = TrustStore(operator.public, bd.b64d(witness_public_b64))
    assert store.accept(entries[-1]).bundle == prev.bundle
    # Read-only: nothing but countersign writes.
    assert httpx.post(f"{url}/witness/v1/log", json={}).status_code in (404, 405)


# -- publishing: real etcd, the real witness process, a publisher killed midway ---------------

async def _etcd_get(endpoints: str, key: str) -> bytes | None:
    from bkv_server.etcd import connect

    client = await connect(endpoints)
    try:
        got = await client.get(key.encode())
        return got.value if got is not None else None
    finally:
        await client.close()


def _publish_argv(tmp_path: Path, operator: bd.RootKey, witness_url: str, etcd_endpoints: str, prefix: str):
    """`bkv-hsm-proxy publish-bundle` for one new fleet, into its own etcd keyspace."""
    key_file = tmp_path / "operator.key"
    key_file.write_text(b64e(operator.reveal()) + "\n")
    f = make_fleet(now=int(time.time()))
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"fleet_id": f.fleet_id, "fleet_public_key": b64e(f.fleet_public_key)}))
    return [sys.executable, "-m", "bkv_hsm_proxy", "publish-bundle", "--operator-key", str(key_file),
            "--witness-url", witness_url, "--fleet-params", str(params), "--edge-public-key", b64e(f.edge_public_key),
            "--etcd-endpoints", etcd_endpoints, "--etcd-prefix", prefix]


def test_a_publisher_killed_between_the_witness_and_etcd_is_finished_by_the_next_run_without_a_fork(
        roots, witness_process, fleet, tmp_path):
    from bkv.audit import audit
    from bkv_server.fleetmap import FLEET_BUNDLE_KEY, FLEET_PENDING_BUNDLE_KEY

    operator, _ = roots
    url, witness_public_b64, _ = witness_process
    prefix = f"/pubtest-{os.urandom(4).hex()}"  # the shared fleet's etcd, a keyspace of our own
    killing = threading.Event()
    publisher: dict[str, subprocess.Popen] = {}

    def between_witness_and_etcd(method, path, body, forward):
        answer = forward()  # the witness has countersigned and logged the bundle ...
        if killing.is_set() and path == "/witness/v1/countersign":
            publisher["proc"].kill()  # ... and the publisher dies before it hears back
            publisher["proc"].wait()
            return None
        return answer

    with OnPath(url, between_witness_and_etcd) as box:
        argv = _publish_argv(tmp_path, operator, box.url, fleet.etcd_endpoints, prefix)
        first = procs.run(argv, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0 and json.loads(first.stdout)["sequence"] == 1, first.stderr
        killing.set()
        publisher["proc"] = procs.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert publisher["proc"].wait(timeout=60) == -signal.SIGKILL
        killing.clear()
        logged = httpx.get(f"{url}/witness/v1/log").json()["entries"]
        assert [bd.SignedBundle.from_json(e).bundle.sequence for e in logged] == [1, 2]
        served = asyncio.run(_etcd_get(fleet.etcd_endpoints, prefix + FLEET_BUNDLE_KEY))
        assert bd.SignedBundle.from_json(served).bundle.sequence == 1  # the swap never happened
        pending = bd.SignedBundle.from_json(asyncio.run(_etcd_get(fleet.etcd_endpoints,
                                                                  prefix + FLEET_PENDING_BUNDLE_KEY)))
        assert pending.bundle == bd.SignedBundle.from_json(logged[1]).bundle

        # The next run asks for other content (fleet windows of 30 days): before the pending
        # key, it built a different bundle 2 here, which the witness refused as a fork, for good.
        again = procs.run(argv + ["--valid-days", "30"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)
    assert out["finished_pending"] == [2] and out["sequence"] == 3
    entries = httpx.get(f"{url}/witness/v1/log").json()["entries"]
    chain = [bd.SignedBundle.from_json(e) for e in entries]
    assert [c.bundle.sequence for c in chain] == [1, 2, 3]
    assert chain[1].bundle == pending.bundle and chain[1].operator_signature == pending.operator_signature
    assert chain[2].bundle.fleets[0].not_after - chain[2].bundle.fleets[0].not_before == 30 * 86400 + 300
    # One chain, no fork, both roots' signatures on every entry; etcd serves the log's last entry byte for byte.
    audit(entries, entries, operator.public, bd.b64d(witness_public_b64))
    assert asyncio.run(_etcd_get(fleet.etcd_endpoints, prefix + FLEET_BUNDLE_KEY)).decode() == entries[2]
    assert asyncio.run(_etcd_get(fleet.etcd_endpoints, prefix + FLEET_PENDING_BUNDLE_KEY)) is None


def test_a_bundle_the_witness_logged_but_etcd_never_got_is_published_from_the_log_not_forked(
        roots, witness_process, fleet, tmp_path):
    """What a publisher from before pending bundles left behind (or an etcd restored
    from a backup): the witness holds bundle 2, etcd serves bundle 1, no pending key."""
    from bkv_server.fleetmap import FLEET_BUNDLE_KEY

    operator, _ = roots
    url, _, _ = witness_process
    prefix = f"/pubtest-{os.urandom(4).hex()}"
    argv = _publish_argv(tmp_path, operator, url, fleet.etcd_endpoints, prefix)
    assert procs.run(argv, capture_output=True, timeout=60).returncode == 0
    first = bd.SignedBundle.from_json(asyncio.run(_etcd_get(fleet.etcd_endpoints, prefix + FLEET_BUNDLE_KEY)))
    orphan = bd.operator_sign(bd.next_bundle(first, list(first.bundle.fleets)), operator)
    assert httpx.post(f"{url}/witness/v1/countersign", json={"bundle": orphan.to_json()}).status_code == 200
    again = procs.run(argv, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["finished_pending"] == [2] and json.loads(again.stdout)["sequence"] == 3
    entries = httpx.get(f"{url}/witness/v1/log").json()["entries"]
    assert [bd.SignedBundle.from_json(e).bundle.sequence for e in entries] == [1, 2, 3]
    assert bd.SignedBundle.from_json(entries[1]).bundle == orphan.bundle
    assert asyncio.run(_etcd_get(fleet.etcd_endpoints, prefix + FLEET_BUNDLE_KEY)).decode() == entries[2]


# -- audit ------------------------------------------------------------------------------------

def test_the_audit_passes_on_a_true_chain_and_fails_on_any_altered_byte(roots, witness, tmp_path):
    operator, witness_key = roots
    prev = None
    files = []
    for i in range(2):
        prev = publish(operator, witness, prev, [make_fleet()])
        path = tmp_path / f"bundle-{i + 1}.json"
        path.write_text(prev.to_json() + "\n")
        files.append(path)
    log = tmp_path / "witness.log"
    args = ["--witness-log", str(log), "--operator-root", b64e(operator.public),
            "--witness-root", b64e(witness_key.public)]
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", *map(str, files), *args])
    assert ok.exit_code == 0, ok.output

    def fails_with(path: Path, data: bytes) -> bool:
        original = path.read_bytes()
        path.write_bytes(data)
        try:
            return runner.invoke(app, ["audit", *map(str, files), *args]).exit_code == 12
        finally:
            path.write_bytes(original)

    for path in (files[0], log):
        original = path.read_bytes()
        body = original.rstrip(b"\n")
        # Every byte position of the first entry, each flipped to another plausible byte.
        for pos in range(0, len(body.split(b"\n")[0])):
            altered = bytearray(original)
            altered[pos] = ord("0") if altered[pos] != ord("0") else ord("1")
            assert fails_with(path, bytes(altered)), (path.name, pos, original[max(0, pos - 10):pos + 10])


def test_a_config_pointed_at_other_roots_keeps_its_own_cache_and_adopts_an_old_one_that_verifies(
        roots, witness, tmp_path, monkeypatch):
    """The cache is per pair of pinned roots (a dev fleet made again, a
    cluster): another vault's cache never stops a client, this vault's is
    still refused when tampered, and a cache named before the roots were
    (bundle.json) keeps its rollback floor if it verifies under them."""
    from bkv.config import ClientConfig

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    operator, witness_key = roots

    def config(op: bytes, wit: bytes) -> ClientConfig:
        return ClientConfig(url="http://x", fleet_public_key="", user_id="u", token="t",
                            operator_root=b64e(op), witness_root=b64e(wit))

    ours = config(operator.public, witness_key.public)
    other = config(bd.RootKey.generate().public, witness_key.public)
    assert ours.bundle_cache() != other.bundle_cache()
    # A cache from before: this vault's second bundle, in bundle.json.
    second = publish(operator, witness, publish(operator, witness, None, [make_fleet()]), [make_fleet()])
    legacy = ours.bundle_cache().with_name("bundle.json")
    legacy.parent.mkdir(parents=True)
    legacy.write_text(second.to_json())
    assert other.bundle_cache().exists() is False and legacy.exists()  # not the other vault's to adopt
    adopted = ours.bundle_cache()
    assert adopted.exists() and not legacy.exists()
    store = TrustStore(operator.public, witness_key.public, adopted)
    assert store.current.bundle.sequence == 2  # the floor came along
    adopted.write_text(adopted.read_text().replace('"sequence": 2', '"sequence": 9'))
    with pytest.raises(bd.BundleError):
        TrustStore(operator.public, witness_key.public, ours.bundle_cache())  # still refused when tampered
