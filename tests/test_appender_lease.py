"""The island's appender lease against real etcd (bkv_island/appender.py):
one replica appends at a time; it lets go when idle, when it shuts down, or
by expiry when it dies; a replica that cannot get it goes on after its wait
(liveness only: safety rests on the head's compare-and-swap and the HSM)."""

from __future__ import annotations

import asyncio
import random
import time

from bkv_island.appender import EtcdAppenderLease
from bkv_server import metrics


def two_replicas(etcd, **kw) -> tuple[EtcdAppenderLease, EtcdAppenderLease]:
    prefix = f"/bkv-lease-test-{random.getrandbits(32):08x}"
    return (EtcdAppenderLease(etcd, prefix, "island-a", "island-a-0", **kw),
            EtcdAppenderLease(etcd, prefix, "island-a", "island-a-1", **kw))


def went_on() -> float:
    return metrics.LOG_APPENDER.labels("went_on")._value.get()


async def holder(etcd, lease: EtcdAppenderLease) -> str | None:
    got = await etcd.get(lease.key)
    return None if got is None else got.value.decode()


async def test_a_replica_waits_while_another_appends_and_takes_over_once_it_is_idle(etcd):
    a, b = two_replicas(etcd, linger_s=0.3, wait_s=10.0)
    try:
        await a.acquire()
        assert a.holds() and await holder(etcd, a) == "island-a-0"
        waiting = asyncio.create_task(b.acquire())
        # While a is busy, b does not get it (a refreshes past the TTL meanwhile).
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert not waiting.done() and await holder(etcd, a) == "island-a-0"
            await asyncio.sleep(0.1)
        t = time.monotonic()
        a.idle()
        await asyncio.wait_for(waiting, 5.0)
        assert b.holds() and await holder(etcd, b) == "island-a-1"
        assert time.monotonic() - t < 2.0  # a revoked after its linger; b did not wait for the TTL
        assert not a.holds()
    finally:
        await a.close()
        await b.close()


async def test_a_replica_that_dies_holding_the_lease_loses_it_within_the_ttl(etcd):
    a, b = two_replicas(etcd, ttl_s=2, wait_s=10.0)
    try:
        await a.acquire()
        a._keeper.cancel()  # the process stops: no more refreshes, no revoke
        t = time.monotonic()
        await b.acquire()
        assert b.holds() and await holder(etcd, b) == "island-a-1"
        assert time.monotonic() - t < 2 + 1.5
    finally:
        await b.close()


async def test_a_replica_shutting_down_hands_the_lease_over_at_once(etcd):
    a, b = two_replicas(etcd, ttl_s=5, wait_s=10.0)
    try:
        await a.acquire()
        await a.close()
        assert await holder(etcd, a) is None
        t = time.monotonic()
        await b.acquire()
        assert b.holds() and time.monotonic() - t < 1.0
    finally:
        await b.close()


async def test_a_replica_that_cannot_get_the_lease_goes_on_after_its_wait(etcd):
    a, b = two_replicas(etcd, wait_s=0.5)
    try:
        await a.acquire()  # and stays busy
        before = went_on()
        t = time.monotonic()
        await b.acquire()
        assert not b.holds() and await holder(etcd, a) == "island-a-0"
        assert 0.5 <= time.monotonic() - t < 2.0 and went_on() == before + 1
    finally:
        await a.close()
        await b.close()
