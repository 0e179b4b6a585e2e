"""Rate-limited work queues and the worker loop every component runs, as client-go's.

A key whose reconcile fails, with any exception, is logged with the key, counted
(`workqueue_retries_total{name}` and `svclab_sync_errors_total{name}` in
testbed.client.metrics) and put back after a back-off: per key, 5 ms doubling up to
1,000 s, and at most 10 retries a second over the whole queue (burst 100), which is
client-go's DefaultControllerRateLimiter. A key that reconciles without an error is
forgotten: its next failure starts again at 5 ms. One bad object never ends the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Hashable

from testbed.api.errors import ApiError
from testbed.client import metrics

log = logging.getLogger("svclab.workqueue")

BASE_DELAY = 0.005  # seconds
MAX_DELAY = 1000.0
BUCKET_QPS = 10.0
BUCKET_BURST = 100


class ItemExponentialRateLimiter:
    """base * 2**failures per item, capped at max_delay; forget() resets an item."""

    def __init__(self, base: float = BASE_DELAY, max_delay: float = MAX_DELAY) -> None:
        self.base = base
        self.max_delay = max_delay
        self._failures: dict[Hashable, int] = {}

    def when(self, item: Hashable) -> float:
        failures = self._failures.get(item, 0)
        self._failures[item] = failures + 1
        if failures >= 64:  # 2**64 * base is past any cap: no float overflow
            return self.max_delay
        return min(self.base * 2 ** failures, self.max_delay)

    def num_requeues(self, item: Hashable) -> int:
        return self._failures.get(item, 0)

    def forget(self, item: Hashable) -> None:
        self._failures.pop(item, None)


class BucketRateLimiter:
    """A token bucket over all items: `qps` tokens a second, `burst` at most (golang.org/x/time/rate)."""

    def __init__(self, qps: float = BUCKET_QPS, burst: int = BUCKET_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.qps = qps
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def when(self, _item: Hashable) -> float:
        """Reserve one token; the delay until it is there."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
        self._last = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def num_requeues(self, _item: Hashable) -> int:
        return 0

    def forget(self, _item: Hashable) -> None:
        pass


class ControllerRateLimiter:
    """client-go's DefaultControllerRateLimiter: the longer of the per-item and overall delays."""

    def __init__(self, item: ItemExponentialRateLimiter | None = None,
                 bucket: BucketRateLimiter | None = None) -> None:
        self.item = item or ItemExponentialRateLimiter()
        self.bucket = bucket or BucketRateLimiter()

    def when(self, key: Hashable) -> float:
        return max(self.item.when(key), self.bucket.when(key))

    def num_requeues(self, key: Hashable) -> int:
        return self.item.num_requeues(key)

    def forget(self, key: Hashable) -> None:
        self.item.forget(key)


class WorkQueue:
    """Keys to reconcile; a key queued many times before it is taken is reconciled once."""

    def __init__(self, rate_limiter: ControllerRateLimiter | None = None) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending: set = set()
        self.rate_limiter = rate_limiter or ControllerRateLimiter()

    def add(self, key: Hashable) -> None:
        if key not in self._pending:
            self._pending.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: Hashable, delay: float) -> None:
        if delay <= 0:
            self.add(key)
        else:
            asyncio.get_running_loop().call_later(delay, self.add, key)

    def add_rate_limited(self, key: Hashable) -> float:
        """Queue the key again after its back-off; the delay chosen."""
        delay = self.rate_limiter.when(key)
        self.add_after(key, delay)
        return delay

    def num_requeues(self, key: Hashable) -> int:
        return self.rate_limiter.num_requeues(key)

    def forget(self, key: Hashable) -> None:
        self.rate_limiter.forget(key)

    def __len__(self) -> int:
        return self._queue.qsize()

    async def get(self) -> Hashable:
        key = await self._queue.get()
        self._pending.discard(key)
        return key


def key_text(key: Hashable) -> str:
    """A key as upstream logs it: namespace/name, or name for cluster-scoped objects."""
    if isinstance(key, tuple):
        return "/".join(str(part) for part in key if part != "")
    return str(key)


def handle_error(name: str, queue: WorkQueue, key: Hashable, exc: BaseException) -> float:
    """Count, log and requeue a key whose reconcile failed (client-go's handleErr)."""
    retries = queue.num_requeues(key)
    delay = queue.add_rate_limited(key)
    metrics.RETRIES.labels(name=name).inc()
    metrics.SYNC_ERRORS.labels(name=name).inc()
    if isinstance(exc, ApiError):  # the API server refused or is away: expected, no traceback
        log.info("%s: error syncing %r: %s (retry %d in %.3gs)", name, key_text(key), exc.message, retries + 1, delay)
    else:
        log.error("%s: error syncing %r: %s: %s (retry %d in %.3gs)", name, key_text(key), type(exc).__name__,
                  exc, retries + 1, delay, exc_info=retries == 0)
    return delay


async def run_worker(name: str, queue: WorkQueue, reconcile: Callable[[Hashable], Awaitable[None]]) -> None:
    """Take keys forever: a failed key is retried with back-off, a key that succeeds is forgotten."""
    while True:
        key = await queue.get()
        try:
            await reconcile(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one object's failure must not end the worker
            handle_error(name, queue, key, exc)
        else:
            queue.forget(key)
        # A reconcile that never awaits and a queue that is never empty would otherwise keep
        # the loop to themselves for a whole backlog (health checks, watches, timers wait).
        await asyncio.sleep(0)
