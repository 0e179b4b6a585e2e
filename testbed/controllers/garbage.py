"""Garbage collection: dependents whose owner is gone, and pods no kubelet will finish.

- An object whose controlling owner (ownerReference uid) no longer exists is
  deleted: Pods of a deleted Deployment, EndpointSlices of a deleted Service.
- Pod GC, as upstream's: a pod bound to a node that does not exist, or a
  terminating pod on a node that is not Ready, is deleted at once (grace 0),
  since no kubelet is there to finish it.
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import Message

from testbed.api.errors import ApiError, NotFound
from testbed.client.client import ApiClient
from testbed.controllers.base import Informers, controller_of, node_is_ready

log = logging.getLogger("svclab.controller-manager")

OWNER_KINDS = {"Deployment": "deployments", "Service": "services"}


class GarbageCollector:
    def __init__(self, client: ApiClient, informers: Informers, interval: float = 1.0) -> None:
        self.client = client
        self.informers = informers
        self.interval = interval
        self._wake = asyncio.Event()
        for informer in (informers.deployments, informers.services, informers.nodes):
            informer.on_change(self._on_owner_change)

    def _on_owner_change(self, event_type: str, old: Message | None, new: Message | None) -> None:
        if event_type == "DELETED" or _is_ready_node(old) != _is_ready_node(new):
            self._wake.set()

    def _owner_exists(self, namespace: str, kind: str, uid: str) -> bool:
        informer = self.informers.deployments if kind == "Deployment" else self.informers.services
        return any(o.metadata.uid == uid for o in informer.items() if o.metadata.namespace == namespace)

    def orphans(self) -> list[tuple[str, Message]]:
        out = []
        for kind, informer in (("Pod", self.informers.pods), ("EndpointSlice", self.informers.slices)):
            for obj in informer.items():
                owner = controller_of(obj)
                if owner is None or owner.kind not in OWNER_KINDS or obj.metadata.deletion_timestamp:
                    continue
                if not self._owner_exists(obj.metadata.namespace, owner.kind, owner.uid):
                    out.append((kind, obj))
        return out

    def abandoned_pods(self) -> list[Message]:
        nodes = {n.metadata.name: n for n in self.informers.nodes.items()}
        out = []
        for pod in self.informers.pods.items():
            node = nodes.get(pod.spec.node_name)
            if pod.spec.node_name and node is None:
                out.append(pod)
            elif node is not None and pod.metadata.deletion_timestamp and not node_is_ready(node):
                out.append(pod)
        return out

    async def sweep(self) -> None:
        for kind, obj in self.orphans():
            await self._delete(kind, obj, grace=None)
        for pod in self.abandoned_pods():
            await self._delete("Pod", pod, grace=0)

    async def _delete(self, kind: str, obj: Message, grace: int | None) -> None:
        try:
            await self.client.delete(kind, obj.metadata.name, obj.metadata.namespace, grace)
        except NotFound:
            pass

    async def run(self) -> None:
        for informer in self.informers.all():
            await informer.synced.wait()
        while True:
            try:
                await self.sweep()
            except ApiError as exc:  # the API server is away: sweep again at the next interval
                log.info("garbage collector: %s (retrying)", exc.message)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass


def _is_ready_node(obj: Message | None) -> bool:
    return obj is not None and type(obj).__name__ == "Node" and node_is_ready(obj)
