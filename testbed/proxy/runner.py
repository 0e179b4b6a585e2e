"""A bounded-frequency runner, as upstream's pkg/util/async BoundedFrequencyRunner: bursts
of requests collapse into one run; runs are limited by a token bucket that refills one run
per `min_interval` and holds `burst` (upstream's iptables and nftables proxiers use 2); one
runs at least every `max_interval` even without requests (the periodic full resync). The
burst is what lets a change right after a periodic run go out at once instead of waiting a
whole min_interval. The clock is injected so tests need not sleep.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable


class BoundedFrequencyRunner:
    def __init__(
        self,
        fn: Callable[[], Awaitable[None]],
        min_interval: float,
        max_interval: float,
        burst: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.burst = max(1, burst)
        self._clock = clock
        self._requested = asyncio.Event()
        self._last_run = float("-inf")
        self._tokens = float(self.burst)
        self._refilled_at = clock()

    def request(self) -> None:
        """Ask for a run as soon as the rate limit allows."""
        self._requested.set()

    def _refill(self, now: float) -> None:
        if self.min_interval <= 0:
            self._tokens = float(self.burst)
        else:
            self._tokens = min(float(self.burst), self._tokens + (now - self._refilled_at) / self.min_interval)
        self._refilled_at = now

    def next_run_delay(self, now: float, requested: bool) -> float:
        """Seconds until the next run should start."""
        self._refill(now)
        if not requested and now - self._last_run < self.max_interval:
            return self.max_interval - (now - self._last_run)
        if self._tokens >= 1:
            return 0.0
        return (1 - self._tokens) * self.min_interval

    def ran(self, now: float) -> None:
        """Record a run starting now: it takes one token."""
        self._refill(now)
        self._tokens -= 1
        self._last_run = now

    async def run(self) -> None:
        while True:
            requested = self._requested.is_set()
            delay = self.next_run_delay(self._clock(), requested)
            if delay > 0:
                try:
                    if requested:
                        await asyncio.sleep(delay)
                    else:
                        await asyncio.wait_for(self._requested.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                continue
            self._requested.clear()
            self.ran(self._clock())
            await self._fn()
