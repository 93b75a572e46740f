"""A record escrowed by the build before salted credential identifiers
(issue #25) recovers after the upgrade, on the same token, etcd and state
files: the previous build's own `bkv dev up` and SDK register it, the
fleet is stopped, this build's `bkv dev up` starts on the same state, and
this build's SDK recovers K and changes the password (real processes; the
old build runs from a git worktree of its commit, through PYTHONPATH)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from bkv_dev.fleet import free_base_port
from support import procs

REPO = Path(__file__).resolve().parents[1]
BEFORE_SALTS = "4650c2f"  # the last build whose records use the bare user id as OPAQUE's credential identifier
SOURCES = ["protocol/src", "client/src", "src", "services/frontend", "services/vault-island",
           "services/hsm-proxy", "services/edge", "services/witness"]
PW = "a password from before the upgrade"
K = "5a" * 32

SDK = """
import asyncio, json, sys
from bkv import errors
from bkv.config import ClientConfig
from bkv_protocol.secrets import BackupKey

async def main(step):
    async with ClientConfig.load().client() as vault:
        if step == "register":
            await vault.register(BackupKey(bytes.fromhex(%(k)r)), %(pw)r)
            return {}
        got = await vault.recover(%(pw)r)
        await vault.change_password(%(pw)r, "after the upgrade")
        again = await vault.recover("after the upgrade")
        try:
            await vault.recover(%(pw)r)
            old_works = True
        except errors.WrongPassword:
            old_works = False
        return {"key": got.key.reveal().hex(), "status": got.record_status, "ticket": got.ticket is not None,
                "changed_key": again.key.reveal().hex(), "old_password_works": old_works}

print(json.dumps(asyncio.run(main(sys.argv[1]))))
""" % {"k": K, "pw": PW}


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory):
    if procs.run(["git", "-C", str(REPO), "cat-file", "-e", f"{BEFORE_SALTS}^{{commit}}"],
                 capture_output=True, timeout=30).returncode != 0:
        pytest.skip(f"commit {BEFORE_SALTS} is not in this clone's history (a shallow clone?)")
    path = tmp_path_factory.mktemp("before-salts") / "tree"
    made = procs.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), BEFORE_SALTS],
                     capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    yield path
    procs.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True, timeout=120)


def test_a_record_of_the_build_before_salts_recovers_after_the_upgrade_and_its_password_changes(
        old_tree, tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "BKV_DEV_STATE": str(tmp_path / "state"),
           "PYTHONPATH": ":".join(str(REPO / s) for s in SOURCES)}  # this checkout's build
    old = {**env, "PYTHONPATH": ":".join(str(old_tree / s) for s in SOURCES)}
    base = str(free_base_port())

    def run(e, *argv):
        res = procs.run([sys.executable, *argv], env=e, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (argv, res.stdout[-2000:], res.stderr[-3000:])
        return res.stdout

    try:
        run(old, "-m", "bkv.cli", "dev", "up", "--base-port", base)
        run(old, "-c", SDK, "register")
        run(old, "-m", "bkv.cli", "dev", "down")
        run(env, "-m", "bkv.cli", "dev", "up", "--base-port", base)  # this build, the same state
        got = json.loads(run(env, "-c", SDK, "recover").strip().splitlines()[-1])
    finally:
        procs.run([sys.executable, "-m", "bkv.cli", "dev", "down", "--purge"], env=env, capture_output=True,
                  timeout=120)
    assert got["key"] == K and got["status"] == "reset" and got["ticket"]
    assert got["changed_key"] == K and got["old_password_works"] is False
