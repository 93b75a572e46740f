"""Changing the member set through real processes (docs/reliability.md,
"Replacing an hsm-proxy"): etcd, SoftHSM2, three hsm-proxies with state
files, the island and the frontend; the admin's steps are the CLI's. The
logic alone: tests/test_unit_member_change.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from bkv.errors import VaultUnavailable, WrongPassword
from bkv_dev.fleet import start_fleet
from test_faults import client
from test_hsm_boundary_attacks import ISLAND, PW, registered
from support import procs


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    f = start_fleet(tmp_path_factory.mktemp("members"), islands=[ISLAND], replicas_per_island=1, hsm_proxies=3)
    yield f
    f.down()


def hsm_proxy(fleet, *args: str, hsm: int | None = None) -> subprocess.CompletedProcess:
    """``bkv-hsm-proxy ARGS`` offline, or with hsm-proxy ``hsm``'s settings (token, PIN, state file, etcd)."""
    env = dict(os.environ)
    if hsm is not None:
        env.update(fleet.procs[f"hsm-proxy{hsm}"].env)
        env["BKV_HSM_ETCD_ENDPOINTS"] = fleet.etcd_endpoints
    return procs.run([sys.executable, "-m", "bkv_hsm_proxy", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stderr
    return run.stdout


async def guess_left(fleet, user: str) -> int:
    async with client(fleet, user) as phone:
        with pytest.raises(WrongPassword) as wrong:
            await phone.recover("not the password")
    return wrong.value.attempts_left


async def test_a_lost_state_file_is_replaced_by_a_change_of_the_member_set_with_every_count_intact(three, tmp_path):
    admin = three.state / "admin" / "admin.key"
    user, k = await registered(three)
    for left in (9, 8):
        assert await guess_left(three, user) == left

    # Site 2 loses its state file (a volume gone): it cannot serve again as it was.
    three.kill("hsm-proxy2")
    three.hsm_state_file(2).unlink()

    # 1. The admin orders the set of epoch 1 to freeze; the two reachable members do, and say where.
    order = tmp_path / "freeze.json"
    ok(hsm_proxy(three, "sign-freeze", "--admin-key", str(admin), "--epoch", "1", "--out", str(order)))
    freezes = []
    for i in (0, 1):
        out = tmp_path / f"frozen-{i}.json"
        out.write_text(ok(hsm_proxy(three, "freeze", "--order", str(order), "--hsm-url",
                                    f"http://127.0.0.1:{three.ports.hsm_proxy(i)}")))
        freezes.append(out)
    frozen = [json.loads(f.read_text()) for f in freezes]
    assert frozen[0]["heads"] == frozen[1]["heads"] and frozen[0]["heads"][ISLAND]["index"] >= 3
    # Frozen, the old set commits nothing: the vault answers no guess (and counts none).
    async with client(three, user, deadline_s=3.0) as phone:
        with pytest.raises(VaultUnavailable):
            await phone.recover("not the password")
    # An order that is not the admin's freezes nothing.
    forged = tmp_path / "forged.json"
    other_key = tmp_path / "other.key"
    ok(hsm_proxy(three, "admin-key", "--out", str(other_key)))
    ok(hsm_proxy(three, "sign-freeze", "--admin-key", str(other_key), "--epoch", "1", "--out", str(forged)))
    assert hsm_proxy(three, "freeze", "--order", str(forged), "--hsm-url",
                     f"http://127.0.0.1:{three.ports.hsm_proxy(1)}").returncode == 1

    # 2. The admin signs the next set at the heads they froze at.
    new = tmp_path / "members-2.json"
    ok(hsm_proxy(three, "sign-members", "--admin-key", str(admin), "--members", "hsm-0,hsm-1,hsm-2", "--epoch", "2",
                 "--freezes", *map(str, freezes), "--out", str(new)))

    # 3. Each member adopts it, stopped; site 2 gets a state file at those heads, not an empty one.
    old_state_1 = three.hsm_state_file(1).read_bytes()
    for i in (0, 1):
        three.kill(f"hsm-proxy{i}")
    one_freeze = hsm_proxy(three, "change-members", "--hsm-id", "hsm-2", "--member-set", str(new),
                           "--freezes", str(freezes[0]), hsm=2)
    assert one_freeze.returncode == 1 and "needs 2" in one_freeze.stderr  # a committed entry could be lost
    for i in (0, 1, 2):
        adopted = json.loads(ok(hsm_proxy(three, "change-members", "--hsm-id", f"hsm-{i}", "--member-set", str(new),
                                          "--freezes", *map(str, freezes), hsm=i)))
        assert adopted["epoch"] == 2
    heads = json.loads(ok(hsm_proxy(three, "log-heads", "--state-file", str(three.hsm_state_file(2)))))
    assert heads["epoch"] == 2 and not heads["frozen"]
    assert heads["heads"][ISLAND]["index"] == frozen[0]["heads"][ISLAND]["index"]

    # A state file of the old set does not serve any more: the token holds the next.
    saved_new_1 = three.hsm_state_file(1).read_bytes()
    three.hsm_state_file(1).write_bytes(old_state_1)
    proc = three.procs["hsm-proxy1"]
    stale = procs.run(proc.argv, env={**os.environ, **proc.env}, capture_output=True, text=True, timeout=60)
    assert stale.returncode == 4 and "change-members" in stale.stderr
    three.hsm_state_file(1).write_bytes(saved_new_1)

    for i in (0, 1, 2):
        three.start(f"hsm-proxy{i}")
    # The count goes on where it was (8 left before the change), and K comes back for the password.
    assert await guess_left(three, user) == 7
    async with client(three, user) as phone:
        assert (await phone.recover(PW)).key == k
    # The new set: each member serves in epoch 2, quorum 2 of 3.
    for i in (0, 1, 2):
        got = httpx.get(f"http://127.0.0.1:{three.ports.hsm_proxy(i)}/hsm/v1/log/heads", timeout=5).json()
        assert (got["epoch"], got["quorum"], got["frozen"]) == (2, 2, False)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    f = start_fleet(tmp_path_factory.mktemp("members2"), islands=[ISLAND], replicas_per_island=1, hsm_proxies=2)
    yield f
    f.down()


def start_argv(member_set, *freezes) -> list[str]:
    """The chart's hsm-proxy command (charts/backup-key-vault/templates/hsm-proxy.yaml), its id from the env."""
    return [sys.executable, "-m", "bkv_hsm_proxy", "start", "--hsm-id", "$BKV_HSM_ID", "--member-set", str(member_set),
            *(["--freezes", *map(str, freezes)] if freezes else [])]


def run_start(fleet, i: int, member_set, *freezes) -> subprocess.CompletedProcess:
    proc = fleet.procs[f"hsm-proxy{i}"]
    argv = [a.replace("$BKV_HSM_ID", f"hsm-{i}") for a in start_argv(member_set, *freezes)]
    return procs.run(argv, env={**os.environ, **proc.env, "BKV_HSM_ETCD_ENDPOINTS": fleet.etcd_endpoints},
                          capture_output=True, text=True, timeout=60)


def serve_through_start(fleet, i: int, member_set, *freezes) -> None:
    proc = fleet.procs[f"hsm-proxy{i}"]
    proc.argv = [a.replace("$BKV_HSM_ID", f"hsm-{i}") for a in start_argv(member_set, *freezes)]
    proc.env = {**proc.env, "BKV_HSM_ETCD_ENDPOINTS": fleet.etcd_endpoints}
    fleet.start(f"hsm-proxy{i}")  # waits until it is healthy, with a deadline


async def test_a_lost_state_volume_at_2_of_2_is_refused_by_start_and_the_ceremony_through_start_brings_it_back(
        two, tmp_path):
    """What the chart's hsm-proxy does (bkv-hsm-proxy start) when a site's
    state volume is lost at 2 of 2, where a site rolled back to genesis plus
    the honest one would be a quorum on a second branch."""
    admin = two.state / "admin" / "admin.key"
    first = two._member_set("hsm-0,hsm-1")[1]
    for i in (0, 1):  # the hsm-proxies as the chart runs them
        two.kill(f"hsm-proxy{i}")
        serve_through_start(two, i, first)
    user, k = await registered(two)
    for left in (9, 8):
        assert await guess_left(two, user) == left

    # Site 1's state volume is lost: start makes no empty file, it refuses and says what to do.
    two.kill("hsm-proxy1")
    two.hsm_state_file(1).unlink()
    refused = run_start(two, 1, first)
    assert refused.returncode == 4, refused.stderr
    assert "made again after one was lost: replace the site with the member-set ceremony" in refused.stderr
    assert not two.hsm_state_file(1).exists()
    # Nor does a file made by hand (init-state, the old chart's way) serve.
    ok(hsm_proxy(two, "init-state", "--hsm-id", "hsm-1", "--member-set", str(first), "--state-file",
                 str(two.hsm_state_file(1))))
    proc = two.procs["hsm-proxy1"]
    remade = procs.run([sys.executable, "-m", "bkv_hsm_proxy", "serve"], env={**os.environ, **proc.env},
                            capture_output=True, text=True, timeout=60)
    assert remade.returncode == 4 and "made again after one was lost" in remade.stderr
    two.hsm_state_file(1).unlink()

    # The ceremony: the admin's order, the reachable member frozen (its order on stdin, as through kubectl exec)...
    order = tmp_path / "freeze.json"
    ok(hsm_proxy(two, "sign-freeze", "--admin-key", str(admin), "--epoch", "1", "--out", str(order)))
    frozen = tmp_path / "frozen-0.json"
    frozen.write_text(ok(procs.run(
        [sys.executable, "-m", "bkv_hsm_proxy", "freeze", "--order", "-", "--hsm-url",
         f"http://127.0.0.1:{two.ports.hsm_proxy(0)}"], input=order.read_text(), capture_output=True, text=True,
        timeout=60)))
    assert json.loads(frozen.read_text())["heads"][ISLAND]["index"] >= 3
    # ...the next set signed at its heads, and every hsm-proxy restarted on it: start adopts it and serves.
    new = tmp_path / "members-2.json"
    ok(hsm_proxy(two, "sign-members", "--admin-key", str(admin), "--members", "hsm-0,hsm-1", "--epoch", "2",
                 "--freezes", str(frozen), "--out", str(new)))
    two.kill("hsm-proxy0")
    for i in (1, 0):
        serve_through_start(two, i, new, frozen)
    for i in (0, 1):
        got = httpx.get(f"http://127.0.0.1:{two.ports.hsm_proxy(i)}/hsm/v1/log/heads", timeout=5).json()
        assert (got["epoch"], got["quorum"], got["frozen"]) == (2, 2, False)
    # Every count intact: a wrong guess spends exactly one more, and K comes back for the password.
    assert await guess_left(two, user) == 7
    async with client(two, user) as phone:
        assert (await phone.recover(PW)).key == k
    # Restarted again on the same values (a pod restart), both keep their state files and serve.
    for i in (0, 1):
        two.kill(f"hsm-proxy{i}")
        two.start(f"hsm-proxy{i}")
    assert await guess_left(two, user) == 9
