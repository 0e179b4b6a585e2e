"""Scheduler: binds each unscheduled pod to the Ready, schedulable node running the fewest pods."""

from __future__ import annotations

from google.protobuf.message import Message

from testbed.api.errors import Conflict, NotFound
from testbed.api.meta import copy_of
from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.client.informer import WorkQueue
from testbed.controllers.base import Informers, node_is_ready

RETRY_UNSCHEDULABLE = 1.0


class Scheduler:
    def __init__(self, client: ApiClient, informers: Informers) -> None:
        self.client = client
        self.informers = informers
        self.queue = WorkQueue()
        self._bound: dict[tuple[str, str], str] = {}  # binds the cache has not shown yet
        informers.pods.on_change(self._on_pod)
        informers.nodes.on_change(self._on_node)

    def _on_pod(self, _type: str, old: Message | None, new: Message | None) -> None:
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
            n.metadata.name: 0
            for n in self.informers.nodes.items()
            if node_is_ready(n) and not n.spec.unschedulable
        }
        if not load:
            return None
        for pod in self.informers.pods.items():
            if pod.spec.node_name in load and not pod.metadata.deletion_timestamp:
                load[pod.spec.node_name] += 1
        for node_name in self._bound.values():
            if node_name in load:
                load[node_name] += 1
        return min(sorted(load), key=lambda name: load[name])

    async def reconcile(self, key: tuple[str, str]) -> None:
        pod = self.informers.pods.get(*key)
        if pod is None or pod.spec.node_name or pod.metadata.deletion_timestamp or key in self._bound:
            return
        node_name = self.pick_node()
        if node_name is None:
            self.queue.add_after(key, RETRY_UNSCHEDULABLE)
            return
        bound = copy_of(pod)
        bound.spec.node_name = node_name
        # Recorded before the write: the informer may deliver the bound pod
        # before update() returns, and that event is what clears the record.
        self._bound[key] = node_name
        try:
            await self.client.update(bound)
        except Conflict:
            self._bound.pop(key, None)
            self.queue.add_after(key, 0.05)
        except NotFound:
            self._bound.pop(key, None)
