"""Rate limits per account and per device key (docs/architecture.md, "Rate limits").

One :class:`Limiter` per scope (``account`` on the island replica that
appends the user's island, ``device`` on the frontend), with a budget per
kind of work (``guess``: recover_start; ``registration``: registration_start).
Each budget is a token bucket kept as its *theoretical arrival time* (GCRA):
per request one dict lookup and a few float operations, nothing else. In
any window of ``W`` seconds a key is admitted at most
``burst + W * per_minute / 60`` times (:meth:`Budget.most_in`): that is the
limit, and the margin, a flood is measured against.

An operation's second phase is never refused once its first was admitted:
an admitted start leaves a *reservation* for the same key (as Juicebox's
agents do), good for ``RESERVATION_USES`` finishes -- the finish and its
resends -- within ``RESERVATION_TTL_S``; a finish without one (a flood of
made-up finishes) is charged to the budget like a start.

Keys (user ids, device keys) live only in these dicts: never in a metric
(labels are the scope, the budget and the decision) nor in a log line.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

from bkv_server import metrics

# A recovery's or registration's second phase follows its first within
# seconds (the client's Argon2 step and a round trip); a login state lives
# minutes. Four uses: the finish and three resends of it.
RESERVATION_TTL_S = 300.0
RESERVATION_USES = 4
# Expired entries are swept when a table doubles past this size, so memory
# follows the keys active in the last few windows, never every key seen.
_SWEEP_FLOOR = 4096

# op name -> (budget, phase): the operations a limiter sees (bkv_protocol.operations).
PHASES: dict[str, tuple[str, int]] = {
    "recover_start": ("guess", 1), "recover_finish": ("guess", 2),
    "registration_start": ("registration", 1), "registration_finish": ("registration", 2),
}


class Clock(Protocol):
    """Seconds on a monotonic clock (``time.monotonic``; tests inject their own)."""

    def __call__(self) -> float: ...


@dataclass(frozen=True)
class Budget:
    """``per_minute`` sustained, ``burst`` at once; ``per_minute <= 0``: unlimited."""

    per_minute: float
    burst: int

    @property
    def interval_s(self) -> float:
        return 60.0 / self.per_minute

    def most_in(self, window_s: float) -> int:
        """The most requests one key is admitted in any window of ``window_s`` seconds."""
        return self.burst + math.floor(window_s / self.interval_s)


def budgets(settings, scope: str) -> dict[str, Budget]:
    """A service's budgets from its settings' ``<scope>_<budget>_per_minute``
    and ``<scope>_<budget>_burst`` fields."""
    return {name: Budget(getattr(settings, f"{scope}_{name}_per_minute"), getattr(settings, f"{scope}_{name}_burst"))
            for name in ("guess", "registration")}


class RateLimited(Exception):
    """Over a limit: nothing was done. ``retry_after`` whole seconds until
    the next request is admitted (answered as 429 ``rate_limited``)."""

    def __init__(self, scope: str, budget: str, wait_s: float) -> None:
        self.scope, self.budget = scope, budget
        self.retry_after = max(1, math.ceil(wait_s))
        super().__init__(f"too many {budget} requests for this {scope}; retry after {self.retry_after}s")


class _Bucket:
    __slots__ = ("budget", "name", "interval", "tolerance", "tat", "reserved", "sweep_at", "admitted",
                 "refused", "reserved_used")

    def __init__(self, scope: str, name: str, budget: Budget) -> None:
        self.budget, self.name = budget, name
        self.interval = budget.interval_s
        self.tolerance = (budget.burst - 1) * self.interval
        self.tat: dict[str, float] = {}
        self.reserved: dict[str, list[float]] = {}  # key -> [expires, uses left]
        self.sweep_at = _SWEEP_FLOOR
        self.admitted = metrics.child(metrics.RATE_LIMIT_DECISIONS, scope, name, "admitted")
        self.refused = metrics.child(metrics.RATE_LIMIT_DECISIONS, scope, name, "refused")
        self.reserved_used = metrics.child(metrics.RATE_LIMIT_DECISIONS, scope, name, "reserved")


class Limiter:
    """The budgets of one scope, each a GCRA bucket per key (module docstring)."""

    def __init__(self, scope: str, budgets: dict[str, Budget], clock: Clock = time.monotonic) -> None:
        self.scope = scope
        self._clock = clock
        self._buckets = {name: _Bucket(scope, name, b) for name, b in budgets.items() if b.per_minute > 0}

    def admit(self, op: str, key: str) -> None:
        """Admit operation ``op`` (a catalogue name) for ``key``, or raise
        :class:`RateLimited`. Operations without a budget pass."""
        phase = PHASES.get(op)
        bucket = self._buckets.get(phase[0]) if phase is not None else None
        if bucket is None:
            return
        now = self._clock()
        if phase[1] == 2:
            held = bucket.reserved.get(key)
            if held is not None and held[0] > now and held[1] > 0:
                held[1] -= 1
                bucket.reserved_used.inc()
                return
        tat = bucket.tat.get(key, now)
        if tat < now:
            tat = now
        if now < tat - bucket.tolerance:
            bucket.refused.inc()
            raise RateLimited(self.scope, bucket.name, tat - bucket.tolerance - now)
        bucket.tat[key] = tat + bucket.interval
        if phase[1] == 1:
            bucket.reserved[key] = [now + RESERVATION_TTL_S, RESERVATION_USES]
        bucket.admitted.inc()
        if len(bucket.tat) > bucket.sweep_at or len(bucket.reserved) > bucket.sweep_at:
            self._sweep(bucket, now)

    def _sweep(self, bucket: _Bucket, now: float) -> None:
        """Forget keys whose bucket is full again and reservations past their time:
        each is what a key never seen would be."""
        bucket.tat = {k: t for k, t in bucket.tat.items() if t > now}
        bucket.reserved = {k: r for k, r in bucket.reserved.items() if r[0] > now and r[1] > 0}
        bucket.sweep_at = max(_SWEEP_FLOOR, 2 * max(len(bucket.tat), len(bucket.reserved)))

    def keys(self) -> int:
        """How many keys are held (for tests and sizing; never which)."""
        return sum(len(b.tat) for b in self._buckets.values())
