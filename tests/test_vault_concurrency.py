"""Invariant 2 under concurrency: never more than max_attempts guesses."""

from __future__ import annotations

import asyncio
import base64
import os

import httpx
import opaque_ke_py as opaque
import pytest

from bkv import errors
from bkv_server.fleetmap import rendezvous
from bkv_protocol.secrets import BackupKey
from bkv_protocol.hsm_api import EntryState
from conftest import read_entry, unique_user


def _metric(url: str, series: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return 0.0


def _guesses_evaluated(url: str) -> float:
    return _metric(url, "bkv_recover_attempts_spent_total")


LOST_APPENDS = 'bkv_etcd_txn_conflicts_total{operation="log-append"}'
WENT_ON = 'bkv_log_appender_total{event="went_on"}'


async def test_fifty_concurrent_wrong_guesses_across_both_replicas_evaluate_at_most_max_attempts(
        make_client, etcd, fleet):
    user = unique_user("flood")
    await make_client(user).register(BackupKey(os.urandom(32)), "the real password")
    island = rendezvous(user, fleet.spec.islands)
    replicas = [p for name, p in fleet.procs.items() if name.startswith(island + "-")]
    assert len(replicas) == 2
    urls = [f"http://127.0.0.1:{p.port}" for p in replicas]
    before = [_guesses_evaluated(u) for u in urls]
    lost_before = sum(_metric(u, LOST_APPENDS) for u in urls)
    went_on_before = sum(_metric(u, WENT_ON) for u in urls)
    # The frontend sends an island's requests to one replica; here the guesses go straight
    # to both replicas, alternating, to race them against each other.
    async with httpx.AsyncClient(timeout=30) as http:
        async def guess(i: int) -> httpx.Response:
            req = opaque.client_login_start(f"wrong guess {i}".encode()).get_message()
            body = {"user_id": user, "request_id": base64.b64encode(os.urandom(16)).decode(),
                    "credential_request": base64.b64encode(req).decode()}
            return await http.post(urls[i % 2] + "/island/v1/login/start", json=body)

        answers = await asyncio.gather(*(guess(i) for i in range(50)))
    statuses = [a.status_code for a in answers]
    # Every answer that lets a client test a guess corresponds to one committed decrement.
    assert statuses.count(200) == 10 and statuses.count(410) == 40
    assert sorted(a.json()["attempts_left"] for a in answers if a.status_code == 200) == list(range(10))
    per_replica = [_guesses_evaluated(u) - b for u, b in zip(urls, before)]
    assert sum(per_replica) == 10
    # Both replicas served half the guesses each (which one wins each race is up to timing).
    for r in (0, 1):
        assert len([a for i, a in enumerate(answers) if i % 2 == r and a.status_code in (200, 410)]) == 25
    # One appender at a time (the appender lease): a replica loses an append to the
    # other only after it went on without the lease.
    lost = sum(_metric(u, LOST_APPENDS) for u in urls) - lost_before
    went_on = sum(_metric(u, WENT_ON) for u in urls) - went_on_before
    print(f"lost appends {lost}, went on without the lease {went_on}")
    assert lost == 0 or went_on > 0, (lost, went_on)
    entry, _, _ = await read_entry(etcd, fleet, user)
    assert entry.state is EntryState.DESTROYED
    with pytest.raises(errors.LockedOut):
        await make_client(user).recover("the real password")


async def test_concurrent_wrong_guesses_through_the_sdk_never_exceed_the_limit(make_client):
    user = unique_user("flood")
    await make_client(user).register(BackupKey(os.urandom(32)), "the real password")

    async def guess(i: int):
        try:
            await make_client(user).recover(f"wrong guess {i}")
        except errors.VaultError as exc:
            return exc

    outcomes = await asyncio.gather(*(guess(i) for i in range(30)))
    evaluated = [o for o in outcomes if isinstance(o, errors.WrongPassword)]
    assert sorted(o.attempts_left for o in evaluated) == list(range(10))
    assert all(isinstance(o, errors.LockedOut) for o in outcomes if o not in evaluated)
