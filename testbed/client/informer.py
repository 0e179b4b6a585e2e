"""Informers: a local cache of one kind kept current by list + watch, as client-go's.

The cache survives API server restarts: after a lost stream the informer
resumes from its last resourceVersion (kept fresh by bookmarks), and relists
only when that revision has expired.

A handler that raises does not stop the informer nor the other handlers: the error is
logged with the object, counted (svclab_informer_handler_errors_total{kind}), and that
handler gets the object again after a per-object back-off (5 ms doubling to 1,000 s) as a
resync event, MODIFIED with old and new the cached object, as client-go's resyncs are.
"""

from __future__ import annotations

import asyncio
import time
import logging
from typing import Callable

from google.protobuf.message import Message

from testbed.api.errors import ApiError, Expired
from testbed.client import metrics
from testbed.client.client import ApiClient
from testbed.client.workqueue import ItemExponentialRateLimiter, WorkQueue, key_text, run_worker

__all__ = ["Informer", "WorkQueue", "key_of", "run_worker"]

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
        self._handler_backoff = ItemExponentialRateLimiter()  # per (handler, object) that raised

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
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bad message must not end the component: relist
                log.exception("%s informer failed; relisting", self.kind)
                self.connected_since = None
                self.resource_version = ""
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
        for index in range(len(self._handlers)):
            self._deliver(index, event_type, old, new)

    def _deliver(self, index: int, event_type: str, old: Message | None, new: Message | None) -> None:
        key = key_of(new if new is not None else old)
        try:
            self._handlers[index](event_type, old, new)
        except Exception as exc:  # noqa: BLE001 - one object must not stop the informer
            retries = self._handler_backoff.num_requeues((index, key))
            delay = self._handler_backoff.when((index, key))
            metrics.HANDLER_ERRORS.labels(kind=self.kind).inc()
            log.error("%s informer: handler failed for %s %r: %s: %s (retry %d in %.3gs)", self.kind, event_type,
                      key_text(key), type(exc).__name__, exc, retries + 1, delay, exc_info=retries == 0)
            asyncio.get_running_loop().call_later(delay, self._resync, index, key)
            return
        self._handler_backoff.forget((index, key))

    def _resync(self, index: int, key: ObjKey) -> None:
        obj = self.cache.get(key)
        if obj is None:  # gone meanwhile: its DELETED event went to the handler on its own
            self._handler_backoff.forget((index, key))
            return
        self._deliver(index, "MODIFIED", obj, obj)
