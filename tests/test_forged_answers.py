"""Issue #15 end to end: an attacker on the network path in front of Envoy,
holding no key, forges the clear outer HTTP (tests/support/forging_proxy.py).
Through the real fleet, the real Envoy and Noise, with the CLI and the SDK:
a forged answer can make a request fail, never spend an attempt, lock a
user out, or make a device replace its escrowed key.

Every test first checks, from the proxy's own record, that it really
forwarded the sealed request to the edge (the edge answered 200) and then
forged or dropped the answer while the client ran."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re

import pytest

from bkv import errors
from bkv.cli import ExitCode
from support.forging_proxy import (NOISE, PERSUASION, Fault, ForgingProxy, no_record, record_destroyed,
                                   session_unknown, unavailable)
from test_cli_backup import PW, make_device, make_source, tree


@pytest.fixture
def proxy(fleet):
    with ForgingProxy(fleet.edge_url) as p:
        yield p


@pytest.fixture
def device(fleet, tmp_path):
    return make_device(fleet, tmp_path / "home")


@contextlib.contextmanager
def via(device, proxy: ForgingProxy):
    """Point the device's config at the proxy instead of Envoy for a while."""
    path = device.home / "bkv" / "config.toml"
    dataclasses.replace(device.config, edge_url=proxy.url).save(path)
    try:
        yield
    finally:
        device.config.save(path)


def attempts_left_after_a_wrong_guess(device, store: str, dest) -> int:
    """One deliberate wrong guess, straight to Envoy: the fleet's signed count."""
    res = device("restore", "--store", store, "--dest", str(dest), password="not the password")
    assert res.returncode == ExitCode.WRONG_PASSWORD, res.stderr
    return int(re.search(r"(\d+) attempts? left", res.stderr).group(1))


def sealed_and_forged(proxy: ForgingProxy, action: str) -> list:
    """The exchanges the proxy faulted with ``action`` after the edge had
    really answered the sealed request."""
    done = [e for e in proxy.faulted(action) if e.path == NOISE and e.upstream_status == 200]
    assert done, f"the proxy never {action} a sealed answer: {proxy.log}"
    return done


def test_ten_forged_503s_never_lock_out_a_restore_with_the_right_password(fleet, device, proxy, tmp_path):
    src, store, max_attempts = make_source(tmp_path), str(tmp_path / "s"), fleet.spec.max_attempts
    assert device("backup", str(src), "--store", store).returncode == 0
    proxy.script(Fault("forge", unavailable(), indices=range(10)))
    with via(device, proxy):
        res = device("restore", "--store", store, "--dest", str(tmp_path / "d1"))
    sealed_and_forged(proxy, "forged")
    # Either the resend was answered from what was committed, or a transport error: never locked out.
    assert res.returncode in (ExitCode.OK, ExitCode.VAULT_UNAVAILABLE), res.stderr
    left = attempts_left_after_a_wrong_guess(device, store, tmp_path / "d2")
    if res.returncode == ExitCode.OK:
        assert tree(tmp_path / "d1") == tree(src)
        assert left == max_attempts - 1  # the restore's finish reset the count; only the guess is spent
    else:
        # The one restore spent at most its one attempt, however many times the proxy forged.
        assert left in (max_attempts - 2, max_attempts - 1), left
    direct = device("restore", "--store", store, "--dest", str(tmp_path / "d3"))
    assert direct.returncode == 0, direct.stderr
    assert tree(tmp_path / "d3") == tree(src)


def test_a_forged_401_after_forwarding_spends_no_extra_attempt(fleet, device, proxy, tmp_path):
    src, store, max_attempts = make_source(tmp_path), str(tmp_path / "s"), fleet.spec.max_attempts
    assert device("backup", str(src), "--store", store).returncode == 0
    proxy.script(Fault("forge", session_unknown(), indices={0}))
    with via(device, proxy):
        res = device("restore", "--store", store, "--dest", str(tmp_path / "d1"), password="a wrong guess")
    sealed_and_forged(proxy, "forged")
    assert res.returncode in (ExitCode.WRONG_PASSWORD, ExitCode.VAULT_UNAVAILABLE), res.stderr
    if res.returncode == ExitCode.WRONG_PASSWORD:
        assert f"{max_attempts - 1} attempts left" in res.stderr, res.stderr
    # Two wrong guesses in all (that one and this one): two attempts, not three.
    assert attempts_left_after_a_wrong_guess(device, store, tmp_path / "d2") == max_attempts - 2


@pytest.mark.parametrize("where", ["nightly on the same device", "a new device into a new store"])
@pytest.mark.parametrize("forged", ["no_record", "record_destroyed"])
def test_a_forged_no_record_or_record_destroyed_during_a_backup_makes_no_new_key(fleet, device, proxy, tmp_path,
                                                                                 where, forged):
    src, store = make_source(tmp_path), str(tmp_path / "s")
    earlier = device("backup", str(src), "--store", store, "--json")
    assert earlier.returncode == 0 and json.loads(earlier.stdout)["new_key"] is True, earlier.stderr
    if where.startswith("nightly"):
        runner, target = device, store
    else:  # the same account on another machine: no escrow mark, no backups in its store
        runner, target = make_device(fleet, tmp_path / "new-home", user=device.user), str(tmp_path / "s-new")
    before = json.loads(runner("list", "--store", target, "--json").stdout)
    proxy.script(Fault("forge", no_record() if forged == "no_record" else record_destroyed(410), indices={0}))
    with via(runner, proxy):
        res = runner("backup", str(src), "--store", target, "--password-stdin", "--json", stdin=PW + "\n",
                     password=None)
    sealed_and_forged(proxy, "forged")
    # The resend was answered from what was committed (the old key came back), or the
    # backup failed as a transport error, or it stopped and explained: never a new key.
    assert res.returncode in (ExitCode.OK, ExitCode.VAULT_UNAVAILABLE, ExitCode.KEY_NOT_RECOVERED), \
        (res.returncode, res.stderr)
    # Nothing persuades: neither the forger's words nor a command to start over.
    assert PERSUASION not in res.stderr and "--new-key" not in res.stderr
    after = json.loads(runner("list", "--store", target, "--json").stdout)
    if res.returncode == ExitCode.OK:
        assert json.loads(res.stdout)["new_key"] is False, res.stdout
        assert len(after) == len(before) + 1
        assert runner("verify", "--store", target).returncode == 0  # made with the escrowed key
    else:
        assert after == before
    # The escrow is the one the earlier backup was made with.
    restored = device("restore", "--store", store, "--backup", json.loads(earlier.stdout)["backup_id"],
                      "--dest", str(tmp_path / "d"))
    assert restored.returncode == 0, restored.stderr
    assert tree(tmp_path / "d") == tree(src)


@pytest.mark.parametrize("step", ["recovery start, wrong password", "recovery finish, right password"])
def test_connections_dropped_after_forwarding_spend_no_extra_attempt(fleet, device, proxy, tmp_path, step):
    src, store, max_attempts = make_source(tmp_path), str(tmp_path / "s"), fleet.spec.max_attempts
    assert device("backup", str(src), "--store", store).returncode == 0
    wrong = step.endswith("wrong password")
    # Noise requests of a restore: 0 = recovery/start, 1 = recovery/finish (and resends after them).
    proxy.script(Fault("drop", indices={0, 1, 2} if wrong else {1, 2, 3}))
    with via(device, proxy):
        res = device("restore", "--store", store, "--dest", str(tmp_path / "d1"),
                     password="a wrong guess" if wrong else PW)
    sealed_and_forged(proxy, "dropped")
    if wrong:
        assert res.returncode in (ExitCode.WRONG_PASSWORD, ExitCode.VAULT_UNAVAILABLE), res.stderr
        if res.returncode == ExitCode.WRONG_PASSWORD:
            assert f"{max_attempts - 1} attempts left" in res.stderr, res.stderr
        assert attempts_left_after_a_wrong_guess(device, store, tmp_path / "d2") == max_attempts - 2
    else:
        assert res.returncode in (ExitCode.OK, ExitCode.VAULT_UNAVAILABLE), res.stderr
        # The finish reached the vault: the count was reset, whatever the device heard.
        assert attempts_left_after_a_wrong_guess(device, store, tmp_path / "d2") == max_attempts - 1
    assert device("restore", "--store", store, "--dest", str(tmp_path / "d3")).returncode == 0


async def test_the_sdk_never_takes_forged_503s_as_a_lockout(fleet, device, proxy, tmp_path):
    from bkv_protocol.secrets import BackupKey

    key = BackupKey(bytes(range(32)))
    async with device.config.client() as direct:
        await direct.register(key, PW)
    proxy.script(Fault("forge", unavailable(), indices=range(fleet.spec.max_attempts)))
    async with dataclasses.replace(device.config, edge_url=proxy.url).client() as attacked:
        try:
            got = (await attacked.recover(PW)).key
        except errors.VaultUnavailable:
            got = None
    sealed_and_forged(proxy, "forged")
    assert got is None or got == key
    async with device.config.client() as direct:
        assert (await direct.recover(PW)).key == key


@pytest.mark.parametrize("answer", [no_record(), record_destroyed(409), record_destroyed(410)],
                         ids=["404 no_record", "409 record_destroyed", "410 record_destroyed"])
async def test_the_sdk_acts_on_no_unsigned_no_record_or_record_destroyed(fleet, device, proxy, answer):
    from bkv_protocol.secrets import BackupKey

    key = BackupKey(bytes(range(1, 33)))
    async with device.config.client() as direct:
        await direct.register(key, PW)
    proxy.script(Fault("forge", answer, indices={0}))
    async with dataclasses.replace(device.config, edge_url=proxy.url).client() as attacked:
        try:
            got = (await attacked.recover(PW)).key
        except errors.VaultUnavailable:
            got = None
    sealed_and_forged(proxy, "forged")
    assert got is None or got == key
    async with device.config.client() as direct:
        assert (await direct.recover(PW)).key == key
