"""One appender per island at a time: an etcd lease (issue #17, Liveness).

Replicas that append at once race for the log head: the loser's batch is
built again, and on slow links two replicas can keep colliding. So a
replica appends while it holds ``<prefix>/log/<island>/appender`` (its
replica id, on a lease of ``ttl_s``), keeps the lease alive while it has
work and for ``linger_s`` after, then revokes it so another replica takes
over at once. A replica that dies or is cut off loses the key when its
lease expires.

Liveness only: safety never rests on the lease (the head's compare-and-swap
and the HSM boundary decide). So a replica that waited ``wait_s`` without
getting it -- a holder that stays busy, etcd unreachable -- appends anyway
(``bkv_log_appender_total{event="went_on"}``): a race costs a rebuilt batch,
never a guess. The frontend sends an island's requests to one preferred
replica (``bkv_frontend/app.py``), so the waits are rare.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

import aetcd

from bkv_server import metrics
from bkv_server.etcd import RETRYABLE

log = logging.getLogger(__name__)

TTL_S = 2
LINGER_S = 0.25
WAIT_S = 3.0


class AppenderLease(Protocol):
    """The seam the ledger appends through (``Ledger(appender=...)``)."""

    async def acquire(self) -> None:
        """Return once this replica is the island's appender, or after waiting long enough."""

    def idle(self) -> None:
        """The queue drained: keep the lease ``linger_s`` more, then let it go."""

    async def close(self) -> None: ...


class NoLease:
    """Every replica appends when it has work (one replica; unit tests of logic)."""

    async def acquire(self) -> None:
        return None

    def idle(self) -> None:
        return None

    async def close(self) -> None:
        return None


class EtcdAppenderLease:
    def __init__(self, etcd: aetcd.Client, prefix: str, island: str, replica: str, *,
                 ttl_s: int = TTL_S, linger_s: float = LINGER_S, wait_s: float = WAIT_S) -> None:
        self._etcd = etcd
        self.key = f"{prefix}/log/{island}/appender".encode()
        self.replica = replica
        self._ttl_s, self._linger_s, self._wait_s = ttl_s, linger_s, wait_s
        self._lease: aetcd.Lease | None = None
        self._held_until = 0.0   # monotonic time up to which the lease surely lives (we refreshed it)
        self._busy = False       # between acquire and idle
        self._idle_at = 0.0
        self._keeper: asyncio.Task | None = None
        self._kept: aetcd.Lease | None = None  # the lease the keeper refreshes
        for event in ("acquired", "waited", "went_on", "lost", "released"):
            metrics.child(metrics.LOG_APPENDER, event)

    def holds(self) -> bool:
        return self._held_until > time.monotonic()

    async def acquire(self) -> None:
        self._busy = True
        if self.holds():
            return
        deadline, delay, waited = time.monotonic() + self._wait_s, 0.02, False
        while True:
            try:
                if await self._take():
                    metrics.child(metrics.LOG_APPENDER, "acquired").inc()
                    return
            except Exception as exc:  # noqa: BLE001 - etcd unreachable or the lease gone: try again, then go on
                log.debug("appender lease %s: %s", self.key.decode(), exc)
            if time.monotonic() >= deadline:
                metrics.child(metrics.LOG_APPENDER, "went_on").inc()
                return
            if not waited:
                metrics.child(metrics.LOG_APPENDER, "waited").inc()
                waited = True
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.25)

    async def _take(self) -> bool:
        t = time.monotonic()
        try:
            if self._lease is None:
                self._lease = await self._etcd.lease(self._ttl_s)
            tx = self._etcd.transactions
            ok, _ = await self._etcd.transaction(
                compare=[tx.version(self.key) == 0],
                success=[tx.put(self.key, self.replica.encode(), lease=self._lease)], failure=[])
            if not ok:
                got = await self._etcd.get(self.key)
                ok = got is not None and got.value == self.replica.encode() and got.lease == self._lease.id
        except Exception:
            self._lease = None  # perhaps expired: a new one next time
            raise
        if ok:
            self._held_until = t + self._ttl_s * 0.75
            if self._kept is not self._lease:  # one keeper per lease
                self._kept = self._lease
                self._keeper = asyncio.get_running_loop().create_task(self._keep(self._lease))
        return ok

    def idle(self) -> None:
        self._busy, self._idle_at = False, time.monotonic()

    async def _keep(self, lease: aetcd.Lease) -> None:
        """Refresh ``lease`` while busy and ``linger_s`` after, then revoke it."""
        try:
            next_refresh = time.monotonic() + self._ttl_s / 4
            while self._lease is lease:
                now = time.monotonic()
                linger_end = now + self._ttl_s if self._busy else self._idle_at + self._linger_s
                if now >= linger_end:
                    self._lease, self._held_until = None, 0.0
                    return await _revoke(lease)  # another replica takes over now, not after the TTL
                await asyncio.sleep(max(0.0, min(next_refresh, linger_end) - now))
                if time.monotonic() < next_refresh or self._lease is not lease:
                    continue
                t = time.monotonic()
                try:
                    reply = await lease.refresh()
                    alive = reply is not None and reply.TTL > 0
                except RETRYABLE:
                    alive = False
                if not alive:
                    metrics.child(metrics.LOG_APPENDER, "lost").inc()
                    if self._lease is lease:
                        self._held_until, self._lease = 0.0, None
                    return
                if self._lease is lease:
                    self._held_until = t + self._ttl_s * 0.75
                next_refresh = t + self._ttl_s / 4
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the lease expires by itself; only liveness is at stake
            log.exception("appender lease %s", self.key.decode())
            if self._lease is lease:
                self._held_until, self._lease = 0.0, None

    async def close(self) -> None:
        """Let the lease go now (a replica shutting down): another takes over at once."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        lease, self._lease, self._held_until = self._lease, None, 0.0
        if lease is not None:
            await _revoke(lease)


async def _revoke(lease: aetcd.Lease) -> None:
    """Delete the key with its lease; if etcd does not answer, the lease expires anyway."""
    with contextlib.suppress(Exception):
        await lease.revoke()
        metrics.child(metrics.LOG_APPENDER, "released").inc()
