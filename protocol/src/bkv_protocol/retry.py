"""The one retry helper: exponential backoff with jitter under a deadline.
Every retry loop in the project goes through :func:`retry` (or its blocking
twin :func:`retry_sync`, which follows the same schedule)."""

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


def _pauses(backoff: Backoff, clock: Callable[[], float]) -> Iterator[float]:
    """The schedule both drivers follow: jittered exponential pauses until
    the deadline or the attempt cap; exhausting it means give up."""
    end = clock() + backoff.deadline_s
    delay = backoff.first_delay_s
    attempt = 1
    while True:
        now = clock()
        if (backoff.max_attempts is not None and attempt >= backoff.max_attempts) or now >= end:
            return
        yield min(delay * (0.5 + random.random() / 2), max(0.0, end - now))
        delay = min(delay * backoff.multiplier, backoff.max_delay_s)
        attempt += 1


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
    pauses = _pauses(backoff, clock)
    attempt = 0
    while True:
        try:
            return await op(attempt)
        except BaseException as exc:  # noqa: BLE001 - filtered by retry_on
            attempt += 1
            await sleep(_pause_after(exc, attempt, retry_on, pauses))


def _pause_after(exc: BaseException, attempts: int, retry_on: Callable[[BaseException], bool],
                 pauses: Iterator[float]) -> float:
    """How long to wait after ``attempts`` attempts, the last failing with
    ``exc``: raises ``exc`` itself if it is not retried, and DeadlineExceeded
    once the backoff is spent."""
    if not retry_on(exc):
        raise exc
    pause = next(pauses, None)
    if pause is None:
        raise DeadlineExceeded(f"gave up after {attempts} attempts: {exc}") from exc
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
    pauses = _pauses(backoff, clock)
    attempt = 0
    while True:
        try:
            return op(attempt)
        except BaseException as exc:  # noqa: BLE001 - filtered by retry_on
            attempt += 1
            sleep(_pause_after(exc, attempt, retry_on, pauses))
