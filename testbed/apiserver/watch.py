"""Fan-out of store events to watch streams.

Every event is encoded once and the same bytes go to every watcher whose
filter sees it unchanged; a watcher that selects by labels or fields gets an
ADDED or DELETED of its own when an object enters or leaves its selection,
as Kubernetes' watch cache does.
"""

from __future__ import annotations

import asyncio
from collections import deque

from testbed.api.kinds import kind_of
from testbed.api.selectors import ObjectFilter
from testbed.apiserver.store import ADDED, DELETED, Event, encode_event


class WatcherOverflow(Exception):
    pass


class Watcher:
    """One watch stream's queue of encoded events; the hub decides when it wakes."""

    def __init__(self, filt: ObjectFilter, max_pending: int) -> None:
        self.filter = filt
        self._pending: deque[bytes] = deque()
        self._max_pending = max_pending
        self._wakeup = asyncio.Event()
        self.overflowed = False

    @property
    def has_pending(self) -> bool:
        return bool(self._pending) or self.overflowed

    def offer(self, event: Event) -> None:
        data = self.view(event)
        if data is None or self.overflowed:
            return
        if len(self._pending) >= self._max_pending:
            self.overflowed = True
        else:
            self._pending.append(data)

    def push(self, data: bytes) -> None:
        self._pending.append(data)

    def wake(self) -> None:
        self._wakeup.set()

    def view(self, event: Event) -> bytes | None:
        """The bytes this watcher should receive for `event`, or None to skip it."""
        filt = self.filter
        kind = kind_of(event.obj).name
        if filt.kind and filt.kind != kind:
            return None
        if filt.namespace and event.obj.metadata.namespace != filt.namespace:
            return None
        if not filt.by_content:
            return event.encoded()
        was = event.prev is not None and filt.matches(kind, event.prev)
        if event.type == DELETED:
            return event.encoded() if was else None
        now = filt.matches(kind, event.obj)
        if now and (was or event.type == ADDED):
            return event.encoded()
        if now:
            return encode_event(ADDED, event.obj, event.revision)
        if was:
            return encode_event(DELETED, event.obj, event.revision)
        return None

    async def next_batch(self, max_events: int = 1000) -> bytes | None:
        """The pending events, concatenated, once woken; None when woken for a bookmark."""
        await self._wakeup.wait()
        self._wakeup.clear()
        if self.overflowed:
            raise WatcherOverflow()
        if not self._pending:
            return None
        count = min(len(self._pending), max_events)
        if count < len(self._pending):
            self._wakeup.set()
        return b"".join(self._pending.popleft() for _ in range(count))


class WatchHub:
    """Offers every event to every watcher and wakes them in bulk.

    Under load (events arriving within `coalesce` seconds of the last wake-up)
    watchers are woken `coalesce` seconds after the first unsent event rather
    than at once: a watcher then sends several events in one gRPC message,
    whose per-message cost dominates in Python. A lone event is sent at once.
    Idle watchers are woken every `bookmark_interval` seconds to send a BOOKMARK.
    """

    def __init__(self, max_pending: int = 100_000, coalesce: float = 0.002, bookmark_interval: float = 1.0) -> None:
        self._watchers: set[Watcher] = set()
        self._max_pending = max_pending
        self._coalesce = coalesce
        self._bookmark_interval = bookmark_interval
        self._flush_handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._last_flush = 0.0

    def new_watcher(self, filt: ObjectFilter) -> Watcher:
        return Watcher(filt, self._max_pending)

    def subscribe(self, watcher: Watcher) -> None:
        self._watchers.add(watcher)
        watcher.wake()  # sends what it was primed with (or a first bookmark)

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def publish(self, events: list[Event]) -> None:
        if not events:
            return
        for event in events:
            for watcher in self._watchers:
                watcher.offer(event)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            if loop.time() - self._last_flush < self._coalesce:
                self._flush_handle = loop.call_later(self._coalesce, self._flush)
            else:
                self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        self._last_flush = asyncio.get_running_loop().time()
        for watcher in self._watchers:
            if watcher.has_pending:
                watcher.wake()

    async def run_bookmarks(self) -> None:
        while True:
            await asyncio.sleep(self._bookmark_interval)
            for watcher in self._watchers:
                if not watcher.has_pending:
                    watcher.wake()

    def __len__(self) -> int:
        return len(self._watchers)
