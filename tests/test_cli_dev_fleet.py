"""`bkv dev up / status / login / demo / down` as a user runs them."""

from __future__ import annotations

import os
import socket
import sys
import tomllib

import pytest

from bkv_dev.fleet import free_base_port
from bkv_dev.ports import Ports
from support import procs

BKV = [sys.executable, "-m", "bkv.cli"]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "XDG_CONFIG_HOME": str(root / "config"), "BKV_DEV_STATE": str(root / "state")}
    base = free_base_port()
    yield env, base, root
    procs.run([*BKV, "dev", "down", "--purge"], env=env, capture_output=True, timeout=60)


def bkv(env, *args, check=True):
    res = procs.run([*BKV, *args], env=env, capture_output=True, text=True, timeout=180)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def test_dev_up_starts_the_fleet_writes_the_config_and_is_idempotent(cli_env):
    env, base, root = cli_env
    out = bkv(env, "dev", "up", "--base-port", str(base)).stdout
    assert f"{Ports(base).edge_url} (Noise, via Envoy)" in out
    cfg_path = root / "config" / "bkv" / "config.toml"
    cfg = tomllib.loads(cfg_path.read_text())
    assert cfg["identity"]["user_id"] == "dev-user" and cfg["vault"]["fleet_public_key"]
    assert cfg["vault"]["transport"] == "noise" and cfg["vault"]["edge_public_key"] and cfg["identity"]["device_key"]
    assert oct(cfg_path.stat().st_mode & 0o777) == "0o600"
    first = bkv(env, "dev", "status", "--json").stdout
    bkv(env, "dev", "up")  # again: nothing restarts
    assert bkv(env, "dev", "status", "--json").stdout == first


def test_the_demo_recovers_the_key_and_shows_attempts_and_lockout(cli_env):
    env, _, _ = cli_env
    out = bkv(env, "demo").stdout
    assert "same key" in out
    assert "wrong password; 9 attempts left" in out
    assert "even the right password now fails" in out


def test_dev_login_switches_the_identity(cli_env):
    env, _, root = cli_env
    bkv(env, "dev", "login", "alice")
    cfg = tomllib.loads((root / "config" / "bkv" / "config.toml").read_text())
    assert cfg["identity"]["user_id"] == "alice"
    bad = bkv(env, "dev", "login", "not a valid id!", check=False)
    assert bad.returncode == 2 and "user ids" in bad.stderr


def test_dev_up_with_a_taken_port_says_which_port(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "c"), "BKV_DEV_STATE": str(tmp_path / "s")}
    base = free_base_port()
    frontend = Ports(base).frontend
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", frontend))
        squatter.listen()
        res = bkv(env, "dev", "up", "--base-port", str(base), check=False)
    assert res.returncode == 1
    assert f"port {frontend}" in res.stderr and "frontend" in res.stderr


def test_dev_down_purge_removes_every_trace(cli_env):
    env, _, root = cli_env
    bkv(env, "dev", "down", "--purge")
    assert not (root / "state").exists()
    assert bkv(env, "dev", "status", check=False).returncode == 1
