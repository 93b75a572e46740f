"""Faults between sites: five network namespaces on a bridge, each with one
etcd member, one hsm-proxy and island replicas (`bkv dev up --sites 5`).
A site is cut off, or every link is slowed, while load runs; afterwards
every record and counter is checked against what clients were told."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import time

import pytest

from bkv_dev.fleet import NetemUnavailable, start_fleet
from bkv_protocol.encoding import user_ref
from bkv_server.etcd import connect
from reliability_report import ROWS
from test_faults import LIMIT, Ledger, audit, client, load, run_fault, seed
from support import procs

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
                                reason="sites are network namespaces: root, iproute2 and tc")
SITES = 5


@pytest.fixture(scope="module")
def sites_fleet(tmp_path_factory):
    # island-a's three replicas live in sites 0, 1 and 2.
    f = start_fleet(tmp_path_factory.mktemp("sites"), sites=SITES, islands=["island-a"], replicas_per_island=3)
    yield f
    f.down()


async def member_views(fleet) -> list[tuple[int, int] | None]:
    """Each etcd member's own raft (term, index), asked one by one."""
    out = []
    for endpoint in fleet.etcd_endpoints.split(","):
        try:
            c = await connect(endpoint)
            try:
                st = await c.status()
                out.append((st.raft_term, st.raft_index))
            finally:
                await c.close()
        except Exception:  # noqa: BLE001 - a member that does not answer has no view
            out.append(None)
    return out


async def read_entry(endpoints: str, key: str) -> tuple[bytes, int]:
    c = await connect(endpoints)
    try:
        got = await c.get(key.encode())
        return got.value, got.mod_revision
    finally:
        await c.close()


MINORITY_PROBE = r"""
import json, os, sys, httpx
import opaque_ke_py as opaque
from bkv_protocol.encoding import b64e
req = opaque.client_login_start(b"pw-" + sys.argv[2].encode()).get_message()
try:
    r = httpx.post(sys.argv[1] + "/island/v1/login/start",
                   json={"user_id": sys.argv[2], "request_id": b64e(os.urandom(16)), "credential_request": b64e(req)}, timeout=20)
    print(json.dumps({"status": r.status_code}))
except httpx.HTTPError as exc:
    print(json.dumps({"status": None, "error": type(exc).__name__}))
"""


async def test_a_site_cut_off_serves_no_state_change_and_the_fleet_does_not_diverge(sites_fleet):
    fleet = sites_fleet
    sites = fleet.sites
    ledger = Ledger()
    (probe_user,) = await seed(fleet, ledger, 1, "minority")
    etcd = await connect(fleet.etcd_endpoints)
    status = await etcd.status()
    # Site i holds etcd member i, hsm-proxy i and island-a replica i (i < 3). Cut one
    # whose member does not lead, so the majority needs no election: the term
    # must then stay as it is.
    cut = next(i for i in range(3) if f"etcd{i}" != status.leader.name)
    key = f"/bkv/records/island-a/{user_ref(probe_user)}"
    before = await etcd.get(key.encode())
    majority_endpoints = ",".join(e for i, e in enumerate(fleet.etcd_endpoints.split(",")) if i != cut)
    seen = {}

    def fault() -> None:
        sites.cut(cut)
        # Inside the cut site, its own island replica is asked for a guess: with
        # only its local etcd member it cannot commit, so it must not answer.
        island = fleet.procs[f"island-a-{cut}"]
        res = procs.run(["ip", "netns", "exec", sites.ns(cut), sys.executable, "-c", MINORITY_PROBE,
                              f"http://{island.host}:{island.port}", probe_user],
                             capture_output=True, text=True, timeout=60)
        seen.update(json.loads(res.stdout.strip().splitlines()[-1]))
        # Read on the majority side while the site is still cut off. (After
        # healing, the replica's own retry may still commit that guess late:
        # counted, but its answer never reached anyone.)
        seen["entry"] = asyncio.run(read_entry(majority_endpoints, key))

    await run_fault(fleet, "*sites*: a site cut off (its etcd member, not the leader; an hsm-proxy and an island replica)",
                    fault, lambda: sites.heal(cut))
    assert seen.get("status") != 200, seen  # the minority served no guess...
    assert seen["entry"] == (before.value, before.mod_revision)  # ...and changed nothing while cut off
    await etcd.close()
    # After healing, the cut member catches up: every member at one term and log index.
    deadline = time.monotonic() + 30
    while len(set(views := await member_views(fleet))) != 1 or None in views:
        assert time.monotonic() < deadline, f"members diverge after healing: {views}"
        await asyncio.sleep(0.2)
    # ...without deposing the leader (--pre-vote: alone, the cut member could not even
    # start an election, so it came back at the old term)...
    assert views[0][0] == status.raft_term, (status.raft_term, views)
    # ...and the first recovery after healing did not wait on connections to the cut
    # member that looked alive (gRPC keepalive, bkv_server.etcd.KEEPALIVE_MS): without
    # both, it took 4-5 s on a quiet machine, and past a client's 10 s timeout under the
    # load this test runs. With them it takes 1-3.7 s on a loaded two-core CI machine
    # (3.0 s was exceeded twice in CI: 3.71 s, 3.45 s), so the bound is 5 s.
    assert ROWS[-1]["recovery_s"] < 5.0, ROWS[-1]


async def timed_recoveries(fleet, ledger, users, rounds: int, *, patient: bool = False) -> list[float]:
    times = []
    for _ in range(rounds):
        for u in users:
            # On 400 kbit/s links a change takes several round trips between sites (apply, the
            # etcd append, a capture on every hsm-proxy, release): a patient device waits longer.
            async with client(fleet, u, deadline_s=120.0, timeout_s=60.0) if patient else client(fleet, u) as c:
                t = time.perf_counter()
                assert (await c.recover("pw-" + u)).key == ledger.keys[u]
                times.append(time.perf_counter() - t)
    return times


async def test_slow_lossy_links_between_sites_keep_every_count_right(sites_fleet):
    fleet = sites_fleet
    ledger = Ledger()
    guessers = await seed(fleet, ledger, 6, "slow-g")
    honest = await seed(fleet, ledger, 3, "slow-h")
    timed = await seed(fleet, ledger, 2, "slow-t")
    base = await timed_recoveries(fleet, ledger, timed, 3)
    stop = asyncio.Event()
    task = asyncio.create_task(load(fleet, ledger, guessers, honest, stop))
    try:
        fleet.sites.slow(delay_ms=100, loss_pct=5)
        how = "every link 100 ms slower, 5% loss (tc netem)"
    except NetemUnavailable:
        # This kernel has no sch_netem: rate-limit every link with a short queue
        # instead, so packets wait and, when the queue is full, drop.
        fleet.sites.throttle(rate_kbit=400, queue_ms=50)
        how = "every link limited to 400 kbit/s with a 50 ms queue (tc tbf; no netem in this kernel)"
    try:
        slow = await timed_recoveries(fleet, ledger, timed, 3, patient=True)
    finally:
        fleet.sites.unslow()
    t = time.monotonic()
    await timed_recoveries(fleet, ledger, timed[:1], 1)
    recovered = time.monotonic() - t
    stop.set()
    await task
    lost, worst = await audit(fleet, ledger, guessers)
    p50 = lambda xs: round(statistics.median(xs) * 1000)  # noqa: E731
    ROWS.append({"fault": f"*sites*: {how}; one recovery p50 {p50(base)} ms "
                          f"-> {p50(slow)} ms, max {round(max(slow) * 1000)} ms",
                 "ops": ledger.ops, "errors": ledger.errors, "lost": lost, "worst": worst,
                 "recovery_s": round(recovered, 2)})
    assert lost == 0 and worst <= LIMIT
    assert statistics.median(slow) > statistics.median(base)  # the links really were slow
