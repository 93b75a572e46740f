"""The one async retry helper: exponential backoff with jitter under a
deadline. Every retry loop in the project goes through :func:`retry`."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

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
    end = clock() + backoff.deadline_s
    delay = backoff.first_delay_s
    attempt = 0
    while True:
        try:
            return await op(attempt)
        except BaseException as exc:  # noqa: BLE001 - filtered by retry_on
            if not retry_on(exc):
                raise
            attempt += 1
            now = clock()
            out_of_tries = backoff.max_attempts is not None and attempt >= backoff.max_attempts
            if out_of_tries or now >= end:
                raise DeadlineExceeded(f"gave up after {attempt} attempts: {exc}") from exc
            pause = min(delay * (0.5 + random.random() / 2), max(0.0, end - now))
            await sleep(pause)
            delay = min(delay * backoff.multiplier, backoff.max_delay_s)
