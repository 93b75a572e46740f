"""The one retry helper: exponential backoff with jitter under a deadline.
Every retry loop in the project goes through :func:`retry` (or its blocking
twin :func:`retry_sync`, which follows the same schedule).

An error that names its own wait (an attribute ``retry_after_s``: a 429's
Retry-After) is retried no sooner than that, and not at all if the wait
ends past the deadline (then :class:`DeadlineExceeded` at once, from it)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, TypeVar

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """Every attempt failed with a retryable error and the deadline passed.
    ``__cause__`` is the last error."""


@dataclass(frozen=True)
class Backoff:
    deadline_s: float = 10.0
    first_delay_s: float = 0.02
    max_delay_s: float = 1.0
    multiplier: float = 2.0
    max_attempts: int | None = None


class _Pauses:
    """The schedule both drivers follow: jittered exponential pauses until
    the deadline or the attempt cap; exhausting it means give up."""

    def __init__(self, backoff: Backoff, clock: Callable[[], float]) -> None:
        self._backoff, self._clock = backoff, clock
        self.end = clock() + backoff.deadline_s
        self._delay = backoff.first_delay_s
        self._attempt = 1

    def __iter__(self) -> Iterator[float]:
        return self

    def __next__(self) -> float:
        now = self._clock()
        if (self._backoff.max_attempts is not None and self._attempt >= self._backoff.max_attempts) or now >= self.end:
            raise StopIteration
        pause = min(self._delay * (0.5 + random.random() / 2), max(0.0, self.end - now))
        self._delay = min(self._delay * self._backoff.multiplier, self._backoff.max_delay_s)
        self._attempt += 1
        return pause

    def left(self) -> float:
        return self.end - self._clock()


async def retry(
    op: Callable[[int], Awaitable[T]],
    *,
    retry_on: Callable[[BaseException], bool],
    backoff: Backoff = Backoff(),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run ``op(attempt)`` until it returns, raises a non-retryable error, or
    the deadline passes (then :class:`DeadlineExceeded` from the last error).

    ``op`` receives the 0-based attempt number, so callers can rotate
    between replicas.
    """
    pauses = _Pauses(backoff, clock)
    attempt = 0
    while True:
        try:
            return await op(attempt)
        except BaseException as exc:  # noqa: BLE001 - filtered by retry_on
            attempt += 1
            await sleep(_pause_after(exc, attempt, retry_on, pauses))


def _pause_after(exc: BaseException, attempts: int, retry_on: Callable[[BaseException], bool],
                 pauses: _Pauses) -> float:
    """How long to wait after ``attempts`` attempts, the last failing with
    ``exc``: raises ``exc`` itself if it is not retried, and DeadlineExceeded
    once the backoff is spent or the wait ``exc`` names ends past the deadline."""
    if not retry_on(exc):
        raise exc
    pause = next(pauses, None)
    if pause is None:
        raise DeadlineExceeded(f"gave up after {attempts} attempts: {exc}") from exc
    wait = getattr(exc, "retry_after_s", None)
    if wait is not None:
        if wait >= pauses.left():
            raise DeadlineExceeded(f"told to wait {wait:.0f}s, past the deadline: {exc}") from exc
        pause = max(pause, wait)
    return pause


def retry_sync(
    op: Callable[[int], T],
    *,
    retry_on: Callable[[BaseException], bool],
    backoff: Backoff = Backoff(),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """:func:`retry` for blocking callers (the sync SDK under Locust)."""
    pauses = _Pauses(backoff, clock)
    attempt = 0
    while True:
        try:
            return op(attempt)
        except BaseException as exc:  # noqa: BLE001 - filtered by retry_on
            attempt += 1
            sleep(_pause_after(exc, attempt, retry_on, pauses))
