"""A bounded-frequency runner, as upstream's pkg/proxy/runner: bursts of
requests collapse into one run, runs are at least `min_interval` apart, and
one runs at least every `max_interval` even without requests (the periodic
full resync). The clock is injected so tests need not sleep.
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._clock = clock
        self._requested = asyncio.Event()
        self._last_run = float("-inf")

    def request(self) -> None:
        """Ask for a run as soon as min_interval allows."""
        self._requested.set()

    def next_run_delay(self, now: float, requested: bool) -> float:
        """Seconds until the next run should start (pure, for tests)."""
        since = now - self._last_run
        if requested:
            return max(0.0, self.min_interval - since)
        return max(0.0, self.max_interval - since)

    async def run(self) -> None:
        while True:
            delay = self.next_run_delay(self._clock(), self._requested.is_set())
            if delay > 0:
                try:
                    await asyncio.wait_for(self._requested.wait(), delay) if not self._requested.is_set() \
                        else await asyncio.sleep(delay)
                except asyncio.TimeoutError:
                    pass
                continue
            self._requested.clear()
            self._last_run = self._clock()
            await self._fn()
