"""The rate limiter (bkv_server.ratelimit) with an injected clock, and the
SDK's side of a 429 (bkv_protocol.retry honouring the wait it names)."""

from __future__ import annotations

import asyncio

import pytest

from bkv_protocol.retry import Backoff, DeadlineExceeded, retry
from bkv_server.ratelimit import RESERVATION_TTL_S, RESERVATION_USES, Budget, Limiter, RateLimited


class FakeClock:
    """A clock the test moves by hand (satisfies bkv_server.ratelimit.Clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: FakeClock, per_minute: float = 6.0, burst: int = 3) -> Limiter:
    return Limiter("account", {"guess": Budget(per_minute, burst), "registration": Budget(per_minute, burst)},
                   clock=clock)


def admitted(lim: Limiter, op: str, key: str) -> bool:
    try:
        lim.admit(op, key)
    except RateLimited:
        return False
    return True


def test_a_burst_is_admitted_then_the_next_waits_one_interval():
    clock = FakeClock()
    lim = limiter(clock)  # 6 a minute: one every 10 s, 3 at once
    assert [admitted(lim, "recover_start", "alice") for _ in range(4)] == [True, True, True, False]
    with pytest.raises(RateLimited) as refused:
        lim.admit("recover_start", "alice")
    assert refused.value.retry_after == 10
    clock.now += 9.9
    assert not admitted(lim, "recover_start", "alice")
    clock.now += 0.1
    assert admitted(lim, "recover_start", "alice")


def test_the_wait_named_is_rounded_up_to_whole_seconds_and_never_zero():
    clock = FakeClock()
    lim = limiter(clock, per_minute=60.0, burst=1)
    lim.admit("recover_start", "alice")
    clock.now += 0.75
    with pytest.raises(RateLimited) as refused:
        lim.admit("recover_start", "alice")
    assert refused.value.retry_after == 1


def test_keys_and_budgets_are_independent():
    clock = FakeClock()
    lim = limiter(clock, burst=1)
    assert admitted(lim, "recover_start", "alice")
    assert not admitted(lim, "recover_start", "alice")
    assert admitted(lim, "recover_start", "bob")
    assert admitted(lim, "registration_start", "alice")


def test_a_flood_is_held_to_the_stated_bound_in_every_window():
    clock = FakeClock()
    budget = Budget(per_minute=30.0, burst=5)
    lim = Limiter("device", {"guess": budget}, clock=clock)
    times = []
    for step in range(2000):  # 20 requests a second for 100 s
        clock.now = 1000.0 + step * 0.05
        if admitted(lim, "recover_start", "d"):
            times.append(clock.now)
    for window in (1.0, 10.0, 60.0):
        most = max(sum(1 for t in times if start <= t < start + window) for start in times)
        assert most <= budget.most_in(window)
    assert len(times) < 2000 / 10  # the flood was refused most of the time


def test_a_second_phase_is_admitted_on_its_first_phase_reservation_even_with_the_budget_spent():
    clock = FakeClock()
    lim = limiter(clock, burst=1)
    lim.admit("recover_start", "alice")
    assert not admitted(lim, "recover_start", "alice")  # the budget is spent
    for _ in range(RESERVATION_USES):  # the finish and its resends
        assert admitted(lim, "recover_finish", "alice")
    assert not admitted(lim, "recover_finish", "alice")  # a flood of finishes is charged


def test_a_reservation_expires():
    clock = FakeClock()
    lim = limiter(clock, burst=1)
    lim.admit("registration_start", "alice")
    clock.now += RESERVATION_TTL_S + 1
    lim.admit("registration_start", "bob")  # spends nothing of alice's
    assert admitted(lim, "registration_finish", "alice")  # charged: the bucket refilled meanwhile
    assert not admitted(lim, "registration_finish", "alice")


def test_finishes_without_a_start_are_charged_like_starts():
    clock = FakeClock()
    lim = limiter(clock, burst=2)
    assert [admitted(lim, "recover_finish", "mallory") for _ in range(3)] == [True, True, False]


def test_operations_without_a_budget_and_budgets_turned_off_pass():
    clock = FakeClock()
    lim = Limiter("account", {"guess": Budget(0.0, 1), "registration": Budget(6.0, 1)}, clock=clock)
    for _ in range(100):
        lim.admit("recover_start", "alice")
        lim.admit("delete", "alice")
    assert lim.keys() == 0


def test_keys_whose_buckets_refilled_are_forgotten():
    clock = FakeClock()
    lim = limiter(clock, per_minute=600.0, burst=1)
    for i in range(10_000):
        lim.admit("recover_start", f"user-{i}")
        clock.now += 0.2  # each key's bucket is full again 0.1 s after its request
    assert lim.keys() < 5_000


async def test_a_retry_waits_the_time_a_429_names_then_succeeds():
    class Wait(Exception):
        retry_after_s = 3.0

    clock, slept = FakeClock(), []

    async def sleep(s: float) -> None:
        slept.append(s)
        clock.now += s

    async def op(attempt: int) -> str:
        if attempt == 0:
            raise Wait("429")
        return "done"

    assert await retry(op, retry_on=lambda e: isinstance(e, Wait), backoff=Backoff(deadline_s=10.0),
                       clock=clock, sleep=sleep) == "done"
    assert slept == [3.0]


async def test_a_wait_past_the_deadline_gives_up_at_once():
    class Wait(Exception):
        retry_after_s = 30.0

    clock, slept = FakeClock(), []

    async def sleep(s: float) -> None:
        slept.append(s)
        await asyncio.sleep(0)

    async def op(attempt: int) -> str:
        raise Wait("429")

    with pytest.raises(DeadlineExceeded) as gave_up:
        await retry(op, retry_on=lambda e: isinstance(e, Wait), backoff=Backoff(deadline_s=10.0), clock=clock,
                    sleep=sleep)
    assert isinstance(gave_up.value.__cause__, Wait)
    assert slept == []
