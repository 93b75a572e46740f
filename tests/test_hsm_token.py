"""Invariant 7: fleet keys live in the token, sensitive and non-extractable;
the OPAQUE server setup is stored only sealed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bkv_dev.fleet import SOFTHSM_MODULE, TOKEN_LABEL
from support import procs


@pytest.fixture
def token(fleet, monkeypatch):
    from bkv_hsm_proxy.hsm import Pkcs11Hsm

    monkeypatch.setenv("SOFTHSM2_CONF", str(fleet.state / "hsm" / "softhsm2.conf"))
    pin = json.loads((fleet.state / "hsm" / "pins.json").read_text())["user"]
    hsm = Pkcs11Hsm(SOFTHSM_MODULE, TOKEN_LABEL, pin)
    yield hsm
    hsm.close()


def test_keys_in_the_token_are_sensitive_and_not_extractable(token):
    attrs = token.key_attributes()
    assert set(attrs) == {"sealing", "signing"}
    for name, a in attrs.items():
        assert a["sensitive"] is True, name
        assert a["extractable"] is False, name
        assert a["never_extractable"] is True, name
        assert a["local"] is True, name  # generated inside the token, never imported


def test_the_token_refuses_to_export_the_sealing_key(token):
    import pkcs11
    from pkcs11 import Attribute

    seal_key = token._load_keys()[0]
    with pytest.raises(pkcs11.exceptions.PKCS11Error):
        seal_key[Attribute.VALUE]


def test_the_opaque_setup_is_stored_only_sealed(token):
    from bkv_protocol import labels
    from bkv_protocol.encoding import canonical
    from bkv_hsm_proxy.core import VaultHsm
    from bkv_hsm_proxy.hsm import OPAQUE_SETUP_LABEL

    blob = token.load_blob(OPAQUE_SETUP_LABEL)
    vault = VaultHsm(token)
    setup = token.unseal(canonical(labels.OPAQUE_SETUP_AAD, vault.fleet_id.encode()), blob)
    assert len(setup) == 128 and setup not in blob
    # And nothing in the token directory holds it in the clear either.
    tokens_dir = os.environ["SOFTHSM2_CONF"].rsplit("/", 1)[0] + "/tokens"
    for root, _, files in os.walk(tokens_dir):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert setup[:32] not in fh.read()


def test_fleet_init_is_idempotent_and_keeps_the_fleet_key(fleet):
    pin = json.loads((fleet.state / "hsm" / "pins.json").read_text())["user"]
    out = procs.run([sys.executable, "-m", "bkv_hsm_proxy", "fleet-init"], capture_output=True, text=True,
                         env={**os.environ, "SOFTHSM2_CONF": str(fleet.state / "hsm" / "softhsm2.conf"),
                              "BKV_ENV": "dev", "BKV_HSM_TOKEN_LABEL": TOKEN_LABEL, "BKV_HSM_USER_PIN": pin},
                         check=True)
    again = json.loads(out.stdout)
    assert again["created"] is False
    assert again["fleet_public_key"] == fleet.fleet_params["fleet_public_key"]
    assert pin not in out.stdout + out.stderr


def _softhsm_conf(tmp_path) -> Path:
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return conf


def _init_token(conf: Path, label: str) -> None:
    procs.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", "5678", "--pin", "1234"],
                   check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)})


def test_a_token_missing_when_the_library_loaded_is_found_by_the_next_attempt(tmp_path):
    """The start-up race behind `open_token` (bkv_hsm_proxy/hsm.py): SoftHSM2
    lists tokens once per initialization, so a retry must rescan."""
    conf = _softhsm_conf(tmp_path)
    script = f"""
import subprocess
from bkv_hsm_proxy.errors import HsmTokenUnavailable
from bkv_hsm_proxy.hsm import Pkcs11Hsm, open_token
try:
    Pkcs11Hsm({SOFTHSM_MODULE!r}, "late", "1234")
    raise SystemExit("opened a token that does not exist yet")
except HsmTokenUnavailable:
    pass
subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "late", "--so-pin", "5678", "--pin", "1234"],
               check=True, capture_output=True)
open_token({SOFTHSM_MODULE!r}, "late", "1234").close()
print("opened")
"""
    res = procs.run([sys.executable, "-c", script], env={**os.environ, "SOFTHSM2_CONF": str(conf)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "opened", res.stderr


def test_processes_opening_one_token_at_once_all_come_up(tmp_path):
    """Six hsm-proxies starting together on one SoftHSM2 token: now and then one
    sees no token, CKR_GENERAL_ERROR or an uninitialized user PIN while
    another's login rewrites the token file (measured: 10 of 90 opens).
    `open_token` tries again; before, all but "no token" ended the process (a
    CI run lost the sites fleet to it)."""
    conf = _softhsm_conf(tmp_path)
    _init_token(conf, "shared")
    script = f"""
from bkv_hsm_proxy.hsm import open_token
open_token({SOFTHSM_MODULE!r}, "shared", "1234").close()
print("opened")
"""
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for _ in range(8):
        openers = [procs.spawn([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(6)]
        for p in openers:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0 and out.strip() == "opened", err[-2000:]


def test_a_wrong_pin_fails_at_once_and_is_never_tried_again(tmp_path):
    """A real HSM locks its user PIN after a few wrong ones: `open_token`
    must not spend them. Were it retried, the short deadline would end in
    DeadlineExceeded instead."""
    conf = _softhsm_conf(tmp_path)
    _init_token(conf, "pinned")
    script = f"""
from bkv_protocol.retry import Backoff
from bkv_hsm_proxy.errors import HsmLoginFailed
from bkv_hsm_proxy.hsm import open_token
try:
    open_token({SOFTHSM_MODULE!r}, "pinned", "0000", backoff=Backoff(deadline_s=3.0, first_delay_s=0.1))
except HsmLoginFailed as exc:
    print("refused", exc)
"""
    res = procs.run([sys.executable, "-c", script], env={**os.environ, "SOFTHSM2_CONF": str(conf)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("refused open: PinIncorrect"), res.stdout + res.stderr
    assert "0000" not in res.stdout + res.stderr


def test_the_admin_signs_the_member_set_offline_and_fleet_init_fixes_it_in_a_real_token(tmp_path):
    """The CLI path of the member set (docs/kubernetes.md, 'The member set'):
    admin-key and sign-members need no token; fleet-init fixes key and set
    once, refuses a set naming other hsm-proxies than the install runs, and
    a second admin key; serve's check passes for the set's state file."""
    from bkv_protocol import members

    def hsm_proxy(*args: str, **env: str) -> subprocess.CompletedProcess:
        return procs.run([sys.executable, "-m", "bkv_hsm_proxy", *args], capture_output=True, text=True,
                              timeout=120, env={**os.environ, **env})

    key = tmp_path / "offline" / "admin.key"
    made = hsm_proxy("admin-key", "--out", str(key))
    assert made.returncode == 0, made.stderr
    public = json.loads(made.stdout)["admin_public_key"]
    assert oct(key.stat().st_mode & 0o777) == "0o600" and key.read_text().strip() not in made.stdout
    assert hsm_proxy("admin-key", "--out", str(key)).returncode == 1  # a key is never overwritten
    signed = tmp_path / "set.json"
    assert hsm_proxy("sign-members", "--admin-key", str(key), "--members", "hsm-1,hsm-0,hsm-2",
                     "--out", str(signed)).returncode == 0

    conf = _softhsm_conf(tmp_path)
    _init_token(conf, "admin-test")
    env = {"SOFTHSM2_CONF": str(conf), "BKV_ENV": "dev", "BKV_HSM_TOKEN_LABEL": "admin-test",
           "BKV_HSM_USER_PIN": "1234"}
    wrong = hsm_proxy("fleet-init", "--admin-public-key", public, "--member-set", str(signed),
                      "--hsm-members", "hsm-0,hsm-1", **env)
    assert wrong.returncode == 1 and "does not name exactly hsm-0,hsm-1" in wrong.stderr
    ok = hsm_proxy("fleet-init", "--admin-public-key", public, "--member-set", str(signed),
                   "--hsm-members", "hsm-0,hsm-1,hsm-2", **env)
    assert ok.returncode == 0, ok.stderr
    other = tmp_path / "other.key"
    other_public = json.loads(hsm_proxy("admin-key", "--out", str(other)).stdout)["admin_public_key"]
    refused = hsm_proxy("fleet-init", "--admin-public-key", other_public, **env)
    assert refused.returncode == 1 and "another admin key" in refused.stderr

    state = tmp_path / "state.json"
    assert hsm_proxy("init-state", "--hsm-id", "hsm-1", "--member-set", str(signed), "--state-file",
                     str(state)).returncode == 0
    check = f"""
from bkv_hsm_proxy import nvram
from bkv_hsm_proxy.membership import check_members
from bkv_hsm_proxy.hsm import Pkcs11Hsm
token = Pkcs11Hsm({SOFTHSM_MODULE!r}, "admin-test", "1234")
check_members(token, nvram.open_state({str(state)!r})[1])
print("serves")
"""
    # In a process of its own: SoftHSM2 reads its configuration once per process.
    served = procs.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SOFTHSM2_CONF": str(conf)})
    assert served.stdout.strip() == "serves", served.stderr
    assert members.SignedMemberSet.from_json(signed.read_text()).set.members == ("hsm-0", "hsm-1", "hsm-2")


def _admin_fleet(tmp_path, label: str, members: str, **extra: str):
    """A real token fleet-inited with an admin-signed member set: (run the
    hsm-proxy CLI against it, its environment, the signed set, the state file)."""
    key, signed, state = tmp_path / "admin.key", tmp_path / "set.json", tmp_path / "state" / "state.json"
    conf = _softhsm_conf(tmp_path)
    _init_token(conf, label)
    env = {"SOFTHSM2_CONF": str(conf), "BKV_ENV": "dev", "BKV_HSM_TOKEN_LABEL": label,
           "BKV_HSM_USER_PIN": "1234", "BKV_HSM_STATE_FILE": str(state), **extra}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return procs.run([sys.executable, "-m", "bkv_hsm_proxy", *args], capture_output=True, text=True,
                              timeout=120, env={**os.environ, **env})

    public = json.loads(cli("admin-key", "--out", str(key)).stdout)["admin_public_key"]
    assert cli("sign-members", "--admin-key", str(key), "--members", members, "--out", str(signed)).returncode == 0
    assert cli("fleet-init", "--admin-public-key", public, "--member-set", str(signed)).returncode == 0
    return cli, env, signed, state


def test_start_in_a_real_token_makes_a_first_state_file_and_refuses_one_made_again_after_it_served(tmp_path):
    """`bkv-hsm-proxy start`'s decisions (membership.start) and the birth
    marker in a real SoftHSM2 token, each step a process of its own (as the
    pod's restarts are): the marker a first serve stores is what a later
    process finds."""
    hsm_proxy, env, signed, state = _admin_fleet(tmp_path, "start-test", "hsm-0,hsm-1")

    def start_then_check(hsm_id: str = "hsm-1") -> str:
        """start's decision, then serve's checks (no server), in a process of its own."""
        script = f"""
import sys
from bkv_protocol.members import SignedMemberSet
from bkv_hsm_proxy import membership, nvram
from bkv_hsm_proxy.hsm import Pkcs11Hsm
token = Pkcs11Hsm({SOFTHSM_MODULE!r}, "start-test", "1234")
try:
    done = membership.start(token, None, {str(state)!r}, {hsm_id!r},
                            SignedMemberSet.from_json(open({str(signed)!r}).read()), [], None)
    identity = nvram.open_state({str(state)!r})[1]
    membership.check_members(token, identity)
    membership.check_born(token, identity)
except membership.StateRemade as exc:
    print("refused:", exc)
    sys.exit(0)
print(done, identity.born.hex(), token.load_blob("bkv-hsm-state-born/{hsm_id}/1").hex())
"""
        run = procs.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **env})
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    done, born, marker = start_then_check().split()
    assert done == "made" and born == marker  # a first start: the file made, its birth id kept at serve
    saved = state.read_bytes()
    assert start_then_check().split() == ["kept", born, born]  # a restart
    state.unlink()  # the state volume lost
    assert start_then_check().startswith("refused: no state file")
    assert not state.exists()
    made = hsm_proxy("init-state", "--hsm-id", "hsm-1", "--member-set", str(signed))
    assert made.returncode == 0, made.stderr
    served = hsm_proxy("serve")
    assert served.returncode == 4 and "made again after one was lost" in served.stderr
    state.write_bytes(saved)  # an old copy put back: its birth id, the tolerated rollback
    assert start_then_check().split() == ["kept", born, born]


def _log_heads_once_served(port: int, proc, output, failure: str):
    """GET /hsm/v1/log/heads from the hsm-proxy ``proc`` once it serves on
    ``port`` (polled for 60 s); ``output()`` says why if it exits first."""
    import time

    import httpx

    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, output()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/hsm/v1/log/heads", timeout=2)
        except httpx.HTTPError:
            assert time.monotonic() < deadline, failure
            time.sleep(0.2)


def test_serve_upgrades_a_state_file_of_the_build_before_birth_ids_and_keeps_its_heads(tmp_path):
    """An hsm-proxy upgraded over its old state volume (format 2, no birth
    id) serves on it: `serve`, holding the file's lock, rewrites it as format
    3 with the same heads and a new birth id, which the token keeps at this
    first serve. No state volume is made again by hand."""
    import hashlib

    from bkv_dev.fleet import free_base_port

    port = free_base_port()
    hsm_proxy, env, signed, state = _admin_fleet(tmp_path, "upgrade-test", "hsm-0", BKV_HSM_PORT=str(port),
                                                 BKV_HSM_METRICS_PORT="0")
    assert hsm_proxy("init-state", "--hsm-id", "hsm-0", "--member-set", str(signed)).returncode == 0
    # The file as the build before birth ids wrote it, with a head on it.
    new = json.loads(state.read_text())
    identity = json.loads(new["fleet"])
    del identity["born"]
    old = {"format": 2, "fleet": json.dumps(identity, sort_keys=True, separators=(",", ":")), "frozen": False,
           "heads": {"island-a": {"index": 5, "mac": "ab" * 32, "root": "cd" * 32}}}
    old["sha256"] = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    state.write_text(json.dumps(old, sort_keys=True, separators=(",", ":")))

    served = procs.spawn([sys.executable, "-m", "bkv_hsm_proxy", "serve"], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        heads = _log_heads_once_served(port, served, lambda: served.communicate()[1],
                                       "the upgraded hsm-proxy did not serve").json()
    finally:
        procs.end_group(served.pid, leader=served)
        _, err = served.communicate(timeout=30)
    assert "upgraded to format 3" in err
    assert heads["heads"]["island-a"]["index"] == 5  # the heads it captured before the upgrade
    upgraded = json.loads(state.read_text())
    born = json.loads(upgraded["fleet"])["born"]
    assert upgraded["format"] == 3 and len(born) == 32
    check = f"""
from bkv_hsm_proxy.hsm import Pkcs11Hsm
print(Pkcs11Hsm({SOFTHSM_MODULE!r}, "upgrade-test", "1234").load_blob("bkv-hsm-state-born/hsm-0/1").hex())
"""
    marker = procs.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **env})
    assert marker.stdout.strip() == born  # kept by the token at that first serve


def test_start_waits_for_fleet_init_to_write_the_token_then_serves(tmp_path):
    """A new install starts the hsm-proxies beside the fleet-init Job (the
    chart passes --wait-for-fleet-init): `start` on a token that does not
    exist yet waits, says what it waits for, and serves once fleet-init has
    written the token; without the wait it exits 4 at once."""
    import time

    from bkv_dev.fleet import free_base_port

    port = free_base_port()
    conf = _softhsm_conf(tmp_path)
    key, signed, state, log = (tmp_path / "admin.key", tmp_path / "set.json", tmp_path / "state" / "state.json",
                               tmp_path / "start.log")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "BKV_ENV": "dev", "BKV_HSM_TOKEN_LABEL": "wait-test",
           "BKV_HSM_USER_PIN": "1234", "BKV_HSM_STATE_FILE": str(state), "BKV_HSM_PORT": str(port),
           "BKV_HSM_METRICS_PORT": "0"}

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return procs.run([sys.executable, "-m", "bkv_hsm_proxy", *args], capture_output=True, text=True,
                         timeout=120, env={**env, **extra})

    public = json.loads(cli("admin-key", "--out", str(key)).stdout)["admin_public_key"]
    assert cli("sign-members", "--admin-key", str(key), "--members", "hsm-0", "--out", str(signed)).returncode == 0
    start = ("start", "--hsm-id", "hsm-0", "--member-set", str(signed))

    with log.open("w") as err:
        started = procs.spawn([sys.executable, "-m", "bkv_hsm_proxy", *start, "--wait-for-fleet-init", "120"],
                              env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while "waiting for fleet-init (the token" not in log.read_text():
            assert started.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "start did not say it waits for the token"
            time.sleep(0.2)
        _init_token(conf, "wait-test")
        # A token with no fleet in it yet: without the wait, start refuses at once.
        at_once = cli(*start, BKV_HSM_STATE_FILE=str(tmp_path / "other" / "state.json"))
        assert at_once.returncode == 4 and "fleet-init has not written the admin key" in at_once.stderr
        assert cli("fleet-init", "--admin-public-key", public, "--member-set", str(signed)).returncode == 0
        heads = _log_heads_once_served(port, started, log.read_text, "start did not serve after fleet-init")
    finally:
        procs.end_group(started.pid, leader=started)
        started.wait(timeout=30)
    assert heads.status_code == 200 and state.exists()
