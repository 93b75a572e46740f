"""Fault injection on a running fleet with five etcd members (sites on
loopback), two island replicas and two hsm-proxies, under load. After each
fault every record and counter is checked against what the clients were
told. Each test adds a row to docs/reliability.md."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field

import pytest

from bkv_protocol.hsm_api import Entry, EntryState

from bkv import errors
from bkv.sdk import VaultClient
from bkv_protocol.encoding import b64d
from bkv_protocol.retry import Backoff
from bkv_protocol.secrets import BackupKey
from bkv_dev.fleet import start_fleet
from conftest import unique_user

from reliability_report import ROWS
from support import procs

LIMIT = 10


@pytest.fixture(scope="module")
def fleet5(tmp_path_factory):
    f = start_fleet(tmp_path_factory.mktemp("faults5"), etcd_members=5, islands=["island-a"],
                    replicas_per_island=2, hsm_proxies=3)
    yield f
    f.down()


def client(fleet, user: str, *, deadline_s: float = 20.0, **kwargs) -> VaultClient:
    return VaultClient(fleet.frontend_url, b64d(fleet.fleet_params["fleet_public_key"]), user,
                       fleet.issuer().mint(user), backoff=Backoff(deadline_s=deadline_s, first_delay_s=0.05), **kwargs)


@dataclass
class Ledger:
    """What the clients were told, per user."""

    keys: dict[str, BackupKey] = field(default_factory=dict)
    told_wrong: dict[str, int] = field(default_factory=dict)   # WrongPassword answers received
    unknown: dict[str, int] = field(default_factory=dict)      # failed mid-request: may or may not count
    ops: int = 0
    errors: int = 0


async def seed(fleet, ledger: Ledger, n: int, prefix: str) -> list[str]:
    users = [unique_user(prefix) for _ in range(n)]

    async def one(u: str) -> None:
        k = BackupKey(os.urandom(32))
        async with client(fleet, u) as c:
            await c.register(k, "pw-" + u)
        ledger.keys[u] = k

    await asyncio.gather(*(one(u) for u in users))
    return users


async def load(fleet, ledger: Ledger, guessers: list[str], honest: list[str], stop: asyncio.Event) -> None:
    """Wrong guesses on ``guessers`` (at most LIMIT - 2 each, so they survive)
    and full recoveries on ``honest``, until ``stop``."""

    async def guess_loop(u: str) -> None:
        async with client(fleet, u) as c:
            while not stop.is_set() and ledger.told_wrong.get(u, 0) + ledger.unknown.get(u, 0) < LIMIT - 2:
                ledger.ops += 1
                try:
                    await c.recover("wrong")
                except errors.WrongPassword:
                    ledger.told_wrong[u] = ledger.told_wrong.get(u, 0) + 1
                except errors.VaultError:
                    ledger.errors += 1
                    ledger.unknown[u] = ledger.unknown.get(u, 0) + 1
                await asyncio.sleep(0.05)  # pacing the load, not synchronizing

    async def honest_loop(u: str) -> None:
        async with client(fleet, u) as c:
            while not stop.is_set():
                ledger.ops += 1
                try:
                    assert (await c.recover("pw-" + u)).key == ledger.keys[u]
                except errors.VaultError:
                    ledger.errors += 1

    await asyncio.gather(*(guess_loop(u) for u in guessers), *(honest_loop(u) for u in honest))


async def audit(fleet, ledger: Ledger, guessers: list[str]) -> tuple[int, int]:
    """(records lost, max guesses evaluated for a user). Every key must come
    back; each guesser's signed count must match what it was told."""
    lost, worst = 0, 0
    for u, k in ledger.keys.items():
        async with client(fleet, u) as c:
            if u in guessers:
                try:
                    await c.recover("probe: wrong")
                except errors.WrongPassword as exc:
                    used = LIMIT - exc.attempts_left - 1  # before this probe
                    told = ledger.told_wrong.get(u, 0)
                    assert told <= used <= told + ledger.unknown.get(u, 0), (u, told, used)
                    worst = max(worst, used + 1)
            for attempt in range(2):
                try:
                    if (await c.recover("pw-" + u)).key != k:
                        lost += 1
                    break
                except errors.ProtocolError as exc:
                    # A reset whose commit outcome was unknown during the fault leaves the client's
                    # login state stale; starting the recovery again is what a user does.
                    if exc.code != "login_state_rejected" or attempt:
                        raise
                    ledger.errors += 1
                except errors.LockedOut:
                    lost += 1
                    break
    return lost, worst


async def run_fault(fleet, name: str, fault, heal, n_guessers: int = 6, n_honest: int = 3) -> None:
    ledger = Ledger()
    guessers = await seed(fleet, ledger, n_guessers, "g")
    honest = await seed(fleet, ledger, n_honest, "h")
    (prober,) = await seed(fleet, ledger, 1, "p")  # not under load: two recoveries of one user race
    stop = asyncio.Event()
    task = asyncio.create_task(load(fleet, ledger, guessers, honest, stop))
    await asyncio.sleep(0.5)  # let load start before the fault: timing of the experiment, not a sync point
    await asyncio.to_thread(fault)
    await asyncio.sleep(2.0)  # the fleet serves while the fault lasts
    t = time.monotonic()
    await asyncio.to_thread(heal)
    # Recovery time: until one full recovery succeeds again after healing.
    async with client(fleet, prober) as c:
        await c.recover("pw-" + prober)
    recovered = time.monotonic() - t
    await asyncio.sleep(0.5)
    stop.set()
    await task
    lost, worst = await audit(fleet, ledger, guessers)
    ROWS.append({"fault": name, "ops": ledger.ops, "errors": ledger.errors, "lost": lost, "worst": worst,
                 "recovery_s": round(recovered, 2)})
    assert lost == 0
    assert worst <= LIMIT


async def test_killing_two_of_five_etcd_members_loses_nothing_and_the_fleet_keeps_serving(fleet5):
    victims = ["etcd3", "etcd4"]
    await run_fault(fleet5, "2 of 5 etcd members killed, then restarted",
                    lambda: [fleet5.kill(v) for v in victims],
                    lambda: [fleet5.start(v, wait=False) for v in victims])


async def test_killing_the_etcd_leader_during_a_guess_flood_evaluates_at_most_the_limit(fleet5):
    from bkv_server.etcd import connect

    ledger = Ledger()
    (user,) = await seed(fleet5, ledger, 1, "flood")
    etcd = await connect(fleet5.etcd_endpoints)
    leader = (await etcd.status()).leader.name
    await etcd.close()
    told = unknown = ops = errs = 0

    async def guess(i: int):
        nonlocal told, unknown, ops, errs
        ops += 1
        async with client(fleet5, user) as c:
            try:
                await c.recover(f"flood {i}")
            except errors.WrongPassword:
                told += 1
            except errors.LockedOut:
                pass
            except errors.VaultError:
                errs += 1
                unknown += 1

    flood = [asyncio.create_task(guess(i)) for i in range(40)]
    await asyncio.sleep(0.2)  # the flood is under way: experiment timing
    fleet5.kill(leader)
    t = time.monotonic()
    await asyncio.gather(*flood)
    fleet5.start(leader, wait=False)
    assert told <= LIMIT
    async with client(fleet5, user) as c:
        with pytest.raises(errors.LockedOut):  # all 10 were used by the flood
            await c.recover("pw-" + user)
    ROWS.append({"fault": f"etcd leader ({leader}) killed during a 40-guess flood on one user", "ops": ops,
                 "errors": errs, "lost": 0, "worst": told, "recovery_s": round(time.monotonic() - t, 2)})


async def test_kill_9_of_an_island_replica_and_an_hsm_proxy_mid_load_is_retried_elsewhere(fleet5):
    await run_fault(fleet5, "kill -9 of one island replica and one hsm-proxy, then restarted",
                    lambda: (fleet5.kill("island-a-0", signal.SIGKILL), fleet5.kill("hsm-proxy0", signal.SIGKILL)),
                    lambda: (fleet5.start("island-a-0"), fleet5.start("hsm-proxy0")))


async def add_island(fleet, island: str, timeout_s: float = 120) -> float:
    """Start the new island's replicas, then `bkv-island add-island` with the two island sets the dev admin
    key signed for it; returns how long the move took."""
    import subprocess
    import sys

    moving, final = await asyncio.to_thread(fleet.add_island, island)
    t = time.monotonic()
    res = await asyncio.to_thread(procs.run, [sys.executable, "-m", "bkv_island", "add-island", island,
                                              "--island-sets", str(moving), str(final)],
                                  env={**os.environ, "BKV_ISLAND_ETCD_ENDPOINTS": fleet.etcd_endpoints,
                                       "BKV_ISLAND_HSM_URLS": ",".join(fleet.hsm_urls)},
                                  capture_output=True, text=True, timeout=timeout_s)
    assert res.returncode == 0, res.stderr
    return time.monotonic() - t


async def test_adding_an_island_under_load_moves_only_its_users_with_their_attempt_counts(fleet5, etcd5):
    """Runs last in this module: it changes the island map."""
    from bkv_server.fleetmap import rendezvous
    from bkv_island.store import user_key

    ledger = Ledger()
    users = await seed(fleet5, ledger, 60, "m")
    dented = users[:20]  # three wrong guesses each before the move

    async def dent(u: str) -> None:
        async with client(fleet5, u) as c:
            for _ in range(3):
                with pytest.raises(errors.WrongPassword):
                    await c.recover("wrong")

    await asyncio.gather(*(dent(u) for u in dented))
    guessers, honest = users[20:26], users[26:29]
    stop = asyncio.Event()
    task = asyncio.create_task(load(fleet5, ledger, guessers, honest, stop))
    took = await add_island(fleet5, "island-b")
    stop.set()
    await task
    moving = [u for u in users if rendezvous(u, ["island-a", "island-b"]) == "island-b"]
    assert moving and len(moving) < len(users)
    for u in users:  # exactly one live copy, where the new map says; the old island keeps a MOVED tombstone
        home = rendezvous(u, ["island-a", "island-b"])
        other = "island-a" if home == "island-b" else "island-b"
        here = await etcd5.get(user_key("/bkv", home, u))
        assert here is not None and Entry.model_validate_json(here.value).state is EntryState.LIVE
        left = await etcd5.get(user_key("/bkv", other, u))
        assert left is None or Entry.model_validate_json(left.value).moved_to == home
    for u in dented:  # attempt counts survive the move
        async with client(fleet5, u) as c:
            with pytest.raises(errors.WrongPassword) as wrong:
                await c.recover("wrong")
        assert wrong.value.attempts_left == 10 - 3 - 1, u
    lost, worst = await audit(fleet5, ledger, guessers)
    ROWS.append({"fault": f"island added under load: {len(moving)} of {len(users)} accounts moved",
                 "ops": ledger.ops, "errors": ledger.errors, "lost": lost, "worst": worst,
                 "recovery_s": round(took, 2)})
    assert lost == 0 and worst <= LIMIT


@pytest.fixture
async def etcd5(fleet5):
    from bkv_server.etcd import connect

    c = await connect(fleet5.etcd_endpoints)
    yield c
    await c.close()
