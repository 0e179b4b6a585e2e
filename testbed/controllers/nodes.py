"""Node controllers: pod CIDR allocation (node IPAM) and node lifecycle.

Lifecycle, as upstream's: a node whose kubelet stops posting status for the
grace period becomes Ready=Unknown and its pods become not ready, so they leave
every Service's endpoints. It times heartbeats by its own clock, from when it
saw each one arrive, not by the kubelet's timestamps.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

from google.protobuf.message import Message

from testbed import fault
from testbed.api.errors import ApiError, Conflict, NotFound
from testbed.api.v1 import api_pb2 as pb
from testbed.api.meta import copy_of, now_rfc3339
from testbed.client.client import ApiClient
from testbed.client import metrics
from testbed.client.informer import WorkQueue
from testbed.controllers.base import Informers

log = logging.getLogger("svclab.controller-manager")


class NodeIpam:
    def __init__(self, client: ApiClient, informers: Informers, cluster_cidr: str, mask: int = 24) -> None:
        self.client = client
        self.informers = informers
        self.subnets = list(ipaddress.ip_network(cluster_cidr).subnets(new_prefix=mask))
        self.queue = WorkQueue()
        self._assigned: dict[str, str] = {}  # node -> CIDR, also before the cache shows it
        informers.nodes.on_change(self._on_node)

    def _on_node(self, _type: str, old: Message | None, new: Message | None) -> None:
        if new is None:
            self._assigned.pop(old.metadata.name, None)
        elif not new.spec.pod_cidr:
            self.queue.add(new.metadata.name)

    async def reconcile(self, name: str) -> None:
        node = self.informers.nodes.get("", name)
        if node is None or node.spec.pod_cidr or name in self._assigned:
            return
        fault.check(node, "nodeipam")
        used = {n.spec.pod_cidr for n in self.informers.nodes.items()} | set(self._assigned.values())
        free = next((str(s) for s in self.subnets if str(s) not in used), None)
        if free is None:
            return  # upstream reports CIDRNotAvailable; the node stays without pods
        update = copy_of(node)
        update.spec.pod_cidr = free
        del update.spec.pod_cidrs[:]
        update.spec.pod_cidrs.append(free)
        await self.client.update(update)
        self._assigned[name] = free


class NodeLifecycle:
    def __init__(self, client: ApiClient, informers: Informers, grace_period: float, interval: float = 0.5) -> None:
        self.client = client
        self.informers = informers
        self.grace_period = grace_period
        self.interval = interval
        self._seen: dict[str, tuple[str, float]] = {}  # node -> (heartbeat, when we saw it)
        informers.nodes.on_change(self._on_node)

    def _on_node(self, _type: str, old: Message | None, new: Message | None) -> None:
        if new is None:
            self._seen.pop(old.metadata.name, None)
            return
        beat = _ready(new).last_heartbeat_time if _ready(new) else ""
        if self._seen.get(new.metadata.name, ("", 0))[0] != beat:
            self._seen[new.metadata.name] = (beat, time.monotonic())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._check_nodes()
            except ApiError as exc:  # the API server is away: judge again once it is back
                log.info("node lifecycle: %s (retrying)", exc.message)
            except Exception:  # noqa: BLE001 - one bad node must not end the controller-manager
                metrics.SYNC_ERRORS.labels(name="nodelifecycle").inc()
                log.exception("node lifecycle: error checking nodes (retrying in %ss)", self.interval)

    async def _check_nodes(self) -> None:
        # Silence is only a node's fault while we could hear it: after our own watch was
        # cut (an API server restart), every node gets a full grace period again.
        heard_since = self.informers.nodes.connected_since
        if heard_since is None:
            return
        now = time.monotonic()
        for node in self.informers.nodes.items():
            ready = _ready(node)
            seen = self._seen.get(node.metadata.name)
            if ready is None or seen is None:
                continue
            if ready.status != "Unknown" and now - max(seen[1], heard_since) > self.grace_period:
                await self._mark_unknown(node)
            if ready.status != "True":
                await self._mark_pods_not_ready(node.metadata.name)

    async def _mark_unknown(self, node: pb.Node) -> None:
        update = copy_of(node)
        ready = _ready(update)
        ready.status = "Unknown"
        ready.reason = "NodeStatusUnknown"
        ready.message = "Kubelet stopped posting node status."
        ready.last_transition_time = now_rfc3339()
        try:
            await self.client.update_status(update)
        except (Conflict, NotFound):
            pass

    async def _mark_pods_not_ready(self, node_name: str) -> None:
        for pod in self.informers.pods.items():
            if pod.spec.node_name != node_name:
                continue
            ready = next((c for c in pod.status.conditions if c.type == "Ready"), None)
            if ready is None or ready.status == "False":
                continue
            update = copy_of(pod)
            cond = next(c for c in update.status.conditions if c.type == "Ready")
            cond.status, cond.reason = "False", "NodeNotReady"
            cond.last_transition_time = now_rfc3339()
            try:
                await self.client.update_status(update)
            except (Conflict, NotFound):
                pass


def _ready(node: pb.Node) -> pb.Condition | None:
    return next((c for c in node.status.conditions if c.type == "Ready"), None)
