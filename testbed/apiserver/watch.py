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
    def __init__(self, filt: ObjectFilter, max_pending: int) -> None:
        self.filter = filt
        self._pending: deque[bytes] = deque()
        self._max_pending = max_pending
        self._wakeup = asyncio.Event()
        self.overflowed = False

    def offer(self, event: Event) -> None:
        data = self.view(event)
        if data is None or self.overflowed:
            return
        if len(self._pending) >= self._max_pending:
            self.overflowed = True
        else:
            self._pending.append(data)
        self._wakeup.set()

    def push(self, data: bytes) -> None:
        self._pending.append(data)
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

    async def next_batch(self, timeout: float, max_events: int = 1000) -> bytes | None:
        """Up to max_events pending events, concatenated; None if none came within timeout."""
        if not self._pending:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        if self.overflowed:
            raise WatcherOverflow()
        count = min(len(self._pending), max_events)
        return b"".join(self._pending.popleft() for _ in range(count))


class WatchHub:
    def __init__(self, max_pending: int = 100_000) -> None:
        self._watchers: set[Watcher] = set()
        self._max_pending = max_pending

    def new_watcher(self, filt: ObjectFilter) -> Watcher:
        return Watcher(filt, self._max_pending)

    def subscribe(self, watcher: Watcher) -> None:
        self._watchers.add(watcher)

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def publish(self, events: list[Event]) -> None:
        for event in events:
            for watcher in self._watchers:
                watcher.offer(event)

    def __len__(self) -> int:
        return len(self._watchers)
