"""Garbage collection: dependents whose owner is gone, and pods no kubelet will finish.

- An object whose controlling owner (ownerReference uid) no longer exists is
  deleted: Pods of a deleted Deployment, EndpointSlices of a deleted Service.
- Pod GC, as upstream's: a pod bound to a node that does not exist, or a
  terminating pod on a node that is not Ready, is deleted at once (grace 0),
  since no kubelet is there to finish it.

Deletes go out in batches of DELETE_BATCH at once (they share the client's write stream),
the collector yielding between batches, so 100,000 dependents are collected with memory
bounded by one batch. A dependent whose delete fails (any error) is logged, counted
(svclab_sync_errors_total{name="garbagecollector"}) and left for a per-object back-off
(5 ms doubling to 1,000 s, forgotten on success) while the others go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Iterator

from google.protobuf.message import Message

from testbed import fault
from testbed.api.errors import ApiError, NotFound
from testbed.client import metrics
from testbed.client.client import ApiClient
from testbed.client.workqueue import ItemExponentialRateLimiter, key_text
from testbed.controllers.base import Informers, controller_of, node_is_ready

log = logging.getLogger("svclab.controller-manager")

OWNER_KINDS = {"Deployment": "deployments", "Service": "services"}
DELETE_BATCH = 100  # deletes in flight at once
MAX_BACKOFF_KEEP = 1000.0  # seconds a failed object's back-off is remembered past its end


class GarbageCollector:
    def __init__(self, client: ApiClient, informers: Informers, interval: float = 1.0) -> None:
        self.client = client
        self.informers = informers
        self.interval = interval
        self._wake = asyncio.Event()
        self._backoff = ItemExponentialRateLimiter()
        self._not_before: dict[tuple[str, str, str], float] = {}  # (kind, ns, name) that failed -> retry time
        for informer in (informers.deployments, informers.services, informers.nodes):
            informer.on_change(self._on_owner_change)

    def _on_owner_change(self, event_type: str, old: Message | None, new: Message | None) -> None:
        if event_type == "DELETED" or _is_ready_node(old) != _is_ready_node(new):
            self._wake.set()

    def _owner_uids(self) -> set[tuple[str, str, str]]:
        """(kind, namespace, uid) of every owner that exists."""
        return {(kind, o.metadata.namespace, o.metadata.uid)
                for kind, informer in (("Deployment", self.informers.deployments), ("Service", self.informers.services))
                for o in informer.items()}

    def orphans(self) -> Iterator[tuple[str, Message]]:
        owners = self._owner_uids()
        for kind, informer in (("Pod", self.informers.pods), ("EndpointSlice", self.informers.slices)):
            for obj in informer.items():
                owner = controller_of(obj)
                if owner is None or owner.kind not in OWNER_KINDS or obj.metadata.deletion_timestamp:
                    continue
                if (owner.kind, obj.metadata.namespace, owner.uid) not in owners:
                    yield kind, obj

    def abandoned_pods(self) -> Iterator[Message]:
        nodes = {n.metadata.name: n for n in self.informers.nodes.items()}
        for pod in self.informers.pods.items():
            node = nodes.get(pod.spec.node_name)
            if pod.spec.node_name and node is None:
                yield pod
            elif node is not None and pod.metadata.deletion_timestamp and not node_is_ready(node):
                yield pod

    def _work(self) -> Iterator[tuple[str, Message, int | None]]:
        for kind, obj in self.orphans():
            yield kind, obj, None
        for pod in self.abandoned_pods():
            yield "Pod", pod, 0

    async def sweep(self) -> int:
        """Delete what is to be collected, DELETE_BATCH at a time; how many deletes succeeded."""
        done, batch = 0, []
        now = time.monotonic()
        for item in self._work():
            if self._not_before.get((item[0], item[1].metadata.namespace, item[1].metadata.name), 0) > now:
                continue  # failed before: its back-off is not over
            batch.append(item)
            if len(batch) >= DELETE_BATCH:
                done += await self._delete_batch(batch)
                batch = []
        if batch:
            done += await self._delete_batch(batch)
        return done

    async def _delete_batch(self, batch: list[tuple[str, Message, int | None]]) -> int:
        results = await asyncio.gather(*(self._delete(kind, obj, grace) for kind, obj, grace in batch))
        return sum(results)

    async def _delete(self, kind: str, obj: Message, grace: int | None) -> bool:
        key = (kind, obj.metadata.namespace, obj.metadata.name)
        try:
            fault.check(obj, "garbagecollector")
            await self.client.delete(kind, obj.metadata.name, obj.metadata.namespace, grace)
        except NotFound:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one object must not stop the collection of the others
            retries = self._backoff.num_requeues(key)
            delay = self._backoff.when(key)
            self._not_before[key] = time.monotonic() + delay
            metrics.SYNC_ERRORS.labels(name="garbagecollector").inc()
            text = exc.message if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
            log.error("garbagecollector: error deleting %s %r: %s (retry %d in %.3gs)", kind,
                      key_text(key[1:]), text, retries + 1, delay)
            return False
        self._backoff.forget(key)
        self._not_before.pop(key, None)
        return True

    async def run(self) -> None:
        for informer in self.informers.all():
            await informer.synced.wait()
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - sweep again at the next interval
                metrics.SYNC_ERRORS.labels(name="garbagecollector").inc()
                log.exception("garbage collector: sweep failed (retrying)")
            self._wake.clear()
            wait = self.interval
            now = time.monotonic()
            for key, when in list(self._not_before.items()):
                if when < now - MAX_BACKOFF_KEEP:  # gone, or no longer collectable: stop tracking it
                    del self._not_before[key]
                    self._backoff.forget(key)
            upcoming = [when for when in self._not_before.values() if when > now]
            if upcoming:  # a failed object's back-off may end before the next interval
                wait = max(0.005, min(wait, min(upcoming) - now))
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass


def _is_ready_node(obj: Message | None) -> bool:
    return obj is not None and type(obj).__name__ == "Node" and node_is_ready(obj)
