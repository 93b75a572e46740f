"""Invariant 2 under concurrency: never more than max_attempts guesses."""

from __future__ import annotations

import asyncio
import os

import httpx

from bkv import errors
from bkv_common.fleetmap import rendezvous
from bkv_common.secrets import BackupKey
from bkv_hsm_proxy.api import EntryState
from conftest import read_entry, unique_user


def _guesses_evaluated(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("bkv_guesses_evaluated_total "):
            return float(line.split()[1])
    return 0.0


async def test_fifty_concurrent_wrong_guesses_across_both_replicas_evaluate_at_most_max_attempts(
        make_client, etcd, fleet):
    user = unique_user("flood")
    await make_client(user).register(BackupKey(os.urandom(32)), "the real password")
    island = rendezvous(user, fleet.spec.islands)
    replicas = [p for name, p in fleet.procs.items() if name.startswith(island + "-")]
    assert len(replicas) == 2
    urls = [f"http://127.0.0.1:{p.port}" for p in replicas]
    before = [_guesses_evaluated(u) for u in urls]

    async def guess(i: int):
        try:
            await make_client(user).recover(f"wrong guess {i}")
        except errors.VaultError as exc:
            return exc
        return None

    outcomes = await asyncio.gather(*(guess(i) for i in range(50)))
    evaluated = [o for o in outcomes if isinstance(o, errors.WrongPassword)]
    refused = [o for o in outcomes if isinstance(o, errors.LockedOut)]
    # Every answer that let the client test its guess corresponds to one committed decrement.
    assert len(evaluated) == 10
    assert sorted(o.attempts_left for o in evaluated) == list(range(10))
    assert len(refused) == 40 and not [o for o in outcomes if o is None]
    after = [_guesses_evaluated(u) for u in urls]
    per_replica = [a - b for a, b in zip(after, before)]
    assert sum(per_replica) == 10
    assert all(n > 0 for n in per_replica), f"both replicas must have served guesses: {per_replica}"
    entry, _, _ = await read_entry(etcd, fleet, user)
    assert entry.state is EntryState.DESTROYED
