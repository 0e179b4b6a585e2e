"""Scheduler: binds each unscheduled pod to the Ready, schedulable node running the fewest pods."""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import Message

from testbed import fault
from testbed.api.errors import ApiError, Conflict, NotFound
from testbed.api.meta import copy_of
from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.client.informer import WorkQueue
from testbed.controllers.base import Informers, node_is_ready

RETRY_UNSCHEDULABLE = 1.0
log = logging.getLogger("svclab.scheduler")


class Scheduler:
    def __init__(self, client: ApiClient, informers: Informers) -> None:
        self.client = client
        self.informers = informers
        self.queue = WorkQueue()
        self._bound: dict[tuple[str, str], str] = {}  # binds the cache has not shown yet
        self._binding: set[asyncio.Task] = set()  # binds in flight
        # Pods on each node (bound, not terminating), kept from the pod events: counting them
        # over the whole cache for every pod scheduled was quadratic (1,000 pods: ~1M visits).
        self._load: dict[str, int] = {}
        informers.pods.on_change(self._on_pod)
        informers.nodes.on_change(self._on_node)

    def _on_pod(self, _type: str, old: Message | None, new: Message | None) -> None:
        for pod, change in ((old, -1), (new, 1)):
            if pod is not None and pod.spec.node_name and not pod.metadata.deletion_timestamp:
                self._load[pod.spec.node_name] = self._load.get(pod.spec.node_name, 0) + change
        if new is not None and not new.spec.node_name and not new.metadata.deletion_timestamp:
            self.queue.add((new.metadata.namespace, new.metadata.name))
        if new is None or new.spec.node_name:
            self._bound.pop(((new or old).metadata.namespace, (new or old).metadata.name), None)

    def _on_node(self, _type: str, old: Message | None, new: Message | None) -> None:
        if new is not None and node_is_ready(new) and (old is None or not node_is_ready(old)):
            for pod in self.informers.pods.items():
                if not pod.spec.node_name:
                    self.queue.add((pod.metadata.namespace, pod.metadata.name))

    def pick_node(self) -> str | None:
        load: dict[str, int] = {
            n.metadata.name: self._load.get(n.metadata.name, 0)
            for n in self.informers.nodes.items()
            if node_is_ready(n) and not n.spec.unschedulable
        }
        if not load:
            return None
        for node_name in self._bound.values():
            if node_name in load:
                load[node_name] += 1
        return min(sorted(load), key=lambda name: load[name])

    async def reconcile(self, key: tuple[str, str]) -> None:
        pod = self.informers.pods.get(*key)
        if pod is None or pod.spec.node_name or pod.metadata.deletion_timestamp or key in self._bound:
            return
        fault.check(pod, "scheduler")
        node_name = self.pick_node()
        if node_name is None:
            self.queue.add_after(key, RETRY_UNSCHEDULABLE)
            return
        bound = copy_of(pod)
        bound.spec.node_name = node_name
        # Recorded before the write: the informer may deliver the bound pod
        # before update() returns, and that event is what clears the record.
        self._bound[key] = node_name
        # The bind goes out without waiting for it (upstream binds asynchronously too): awaiting
        # each one made scheduling a round trip per pod, ~10 s for a burst of 1,000 pods.
        task = asyncio.create_task(self._bind(key, bound))
        self._binding.add(task)
        task.add_done_callback(self._binding.discard)

    async def _bind(self, key: tuple[str, str], bound: pb.Pod) -> None:
        try:
            await self.client.update(bound)
        except Conflict:
            self._bound.pop(key, None)
            self.queue.add_after(key, 0.05)
        except NotFound:
            self._bound.pop(key, None)
        except (ApiError, asyncio.TimeoutError) as exc:
            log.info("scheduler: binding %s/%s: %s (retrying)", *key, getattr(exc, "message", "timed out"))
            self._bound.pop(key, None)
            self.queue.add_after(key, 0.5)
