"""A ``Clock`` (bkv_hsm_proxy.records) that moves only when a test moves it."""

from __future__ import annotations


class FakeClock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def now_ms(self) -> int:
        return self.ms
