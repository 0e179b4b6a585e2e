"""Informers: a local cache of one kind kept current by list + watch, as client-go's.

The cache survives API server restarts: after a lost stream the informer
resumes from its last resourceVersion (kept fresh by bookmarks), and relists
only when that revision has expired.
"""

from __future__ import annotations

import asyncio
import time
import logging
from typing import Awaitable, Callable

from google.protobuf.message import Message

from testbed.api.errors import ApiError, Expired
from testbed.client.client import ApiClient

log = logging.getLogger("svclab.informer")

ObjKey = tuple[str, str]  # (namespace, name)
Handler = Callable[[str, Message | None, Message | None], None]  # (type, old, new)


def key_of(obj: Message) -> ObjKey:
    return (obj.metadata.namespace, obj.metadata.name)


class Informer:
    def __init__(
        self,
        client: ApiClient,
        kind: str,
        namespace: str = "",
        label_selector: str = "",
        field_selector: str = "",
        retry_delay: float = 0.2,
    ) -> None:
        self.client = client
        self.kind = kind
        self._namespace = namespace
        self._labels = label_selector
        self._fields = field_selector
        self._retry_delay = retry_delay
        self.cache: dict[ObjKey, Message] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.connected_since: float | None = None  # monotonic time the current watch stream first answered
        self._handlers: list[Handler] = []

    def on_change(self, handler: Handler) -> None:
        """handler(type, old, new) for ADDED (old None), MODIFIED, DELETED (new None)."""
        self._handlers.append(handler)

    def get(self, namespace: str, name: str) -> Message | None:
        return self.cache.get((namespace, name))

    def items(self) -> list[Message]:
        return list(self.cache.values())

    async def run(self) -> None:
        while True:
            try:
                if not self.resource_version:
                    await self._relist()
                await self._watch()
            except Expired:
                log.info("%s watch expired at %s; relisting", self.kind, self.resource_version)
                self.resource_version = ""
            except ApiError as exc:
                log.debug("%s watch interrupted: %s", self.kind, exc.message)
                self.connected_since = None
                await asyncio.sleep(self._retry_delay)

    async def _relist(self) -> None:
        items, revision = await self.client.list(self.kind, self._namespace, self._labels, self._fields)
        fresh = {key_of(o): o for o in items}
        for key, old in list(self.cache.items()):
            if key not in fresh:
                del self.cache[key]
                self._emit("DELETED", old, None)
        for key, obj in fresh.items():
            old = self.cache.get(key)
            self.cache[key] = obj
            if old is None:
                self._emit("ADDED", None, obj)
            elif old.metadata.resource_version != obj.metadata.resource_version:
                self._emit("MODIFIED", old, obj)
        self.resource_version = revision
        self.synced.set()

    async def _watch(self) -> None:
        async for item in self.client.watch(
            self.kind, self._namespace, self.resource_version, self._labels, self._fields
        ):
            if self.connected_since is None:  # the server answers (bookmarks come every second)
                self.connected_since = time.monotonic()
            if item.type != "BOOKMARK" and item.obj is not None:
                key = key_of(item.obj)
                old = self.cache.get(key)
                if item.type == "DELETED":
                    self.cache.pop(key, None)
                    self._emit("DELETED", old, None)
                else:
                    self.cache[key] = item.obj
                    self._emit("ADDED" if old is None else "MODIFIED", old, item.obj)
            self.resource_version = item.resource_version

    def _emit(self, event_type: str, old: Message | None, new: Message | None) -> None:
        for handler in self._handlers:
            handler(event_type, old, new)


class WorkQueue:
    """Keys to reconcile; a key queued many times before it is taken is reconciled once."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending: set = set()

    def add(self, key) -> None:
        if key not in self._pending:
            self._pending.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self.add, key)

    async def get(self):
        key = await self._queue.get()
        self._pending.discard(key)
        return key


async def run_worker(
    name: str, queue: WorkQueue, reconcile: Callable[[object], Awaitable[None]], retry_delay: float = 0.5
) -> None:
    """Take keys forever; a key whose reconcile fails with an API error is retried later."""
    while True:
        key = await queue.get()
        try:
            await reconcile(key)
        except ApiError as exc:
            log.info("%s: %s: %s (retrying)", name, key, exc.message)
            queue.add_after(key, retry_delay)
        # A reconcile that never awaits and a queue that is never empty would otherwise keep
        # the loop to themselves for a whole backlog (health checks, watches, timers wait).
        await asyncio.sleep(0)
