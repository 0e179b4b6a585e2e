"""Scheduler: binds each unscheduled pod to a feasible node running the fewest pods.

Feasible, as kube-scheduler's filters: the node is Ready (else its not-ready taint is
untolerated), not cordoned, and runs fewer pods than its allocatable["pods"] (NodeResourcesFit).
A pod with no feasible node stays Pending with the condition PodScheduled=False, reason
Unschedulable, and kube-scheduler's message ("0/3 nodes are available: 3 Too many pods.");
it is tried again when a pod leaves a node or a node changes, and every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from google.protobuf.message import Message

from testbed import fault
from testbed.api.errors import ApiError, Conflict, NotFound
from testbed.api.meta import copy_of, now_rfc3339
from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.client.informer import WorkQueue
from testbed.controllers.base import Informers, node_is_ready

RETRY_UNSCHEDULABLE = 5.0  # seconds; events requeue unschedulable pods sooner
DEFAULT_MAX_PODS = 110  # a node that advertises no pods capacity: the kubelet's default
NOT_READY = "node(s) had untolerated taint {node.kubernetes.io/not-ready: }"
UNSCHEDULABLE = "node(s) were unschedulable"
TOO_MANY_PODS = "Too many pods"
log = logging.getLogger("svclab.scheduler")


def allocatable_pods(node: pb.Node) -> int:
    value = node.status.allocatable.get("pods", "")
    return int(value) if value.isdigit() else DEFAULT_MAX_PODS


def fit_error(total: int, reasons: Counter) -> str:
    """kube-scheduler's FitError text: the reasons counted over nodes, sorted as strings."""
    if total == 0:
        return "no nodes available to schedule pods"
    parts = sorted(f"{count} {reason}" for reason, count in reasons.items())
    return f"0/{total} nodes are available: {', '.join(parts)}."


def _counts(pod: pb.Pod | None) -> bool:
    """Takes room on its node: bound and not finished (terminating pods still hold theirs)."""
    return pod is not None and bool(pod.spec.node_name) and pod.status.phase not in ("Succeeded", "Failed")


class Scheduler:
    def __init__(self, client: ApiClient, informers: Informers) -> None:
        self.client = client
        self.informers = informers
        self.queue = WorkQueue()
        self._bound: dict[tuple[str, str], str] = {}  # binds the cache has not shown yet
        self._binding: set[asyncio.Task] = set()  # binds in flight
        # Pods on each node, kept from the pod events: counting them over the whole cache for
        # every pod scheduled was quadratic (1,000 pods: ~1M visits).
        self._load: dict[str, int] = {}
        self._unschedulable: set[tuple[str, str]] = set()
        informers.pods.on_change(self._on_pod)
        informers.nodes.on_change(self._on_node)

    def _on_pod(self, _type: str, old: Message | None, new: Message | None) -> None:
        for pod, change in ((old, -1), (new, 1)):
            if _counts(pod):
                self._load[pod.spec.node_name] = self._load.get(pod.spec.node_name, 0) + change
        key = ((new or old).metadata.namespace, (new or old).metadata.name)
        if new is not None and not new.spec.node_name and not new.metadata.deletion_timestamp:
            self.queue.add(key)
        if new is None or new.spec.node_name:
            self._bound.pop(key, None)
            self._unschedulable.discard(key)
        if _counts(old) and not _counts(new):  # room freed on a node
            self._requeue_unschedulable()

    def _on_node(self, _type: str, old: Message | None, new: Message | None) -> None:
        if new is None:
            return
        if old is None or (node_is_ready(new), new.spec.unschedulable, dict(new.status.allocatable)) != (
                node_is_ready(old), old.spec.unschedulable, dict(old.status.allocatable)):
            self._requeue_unschedulable()

    def _requeue_unschedulable(self) -> None:
        for key in self._unschedulable:
            self.queue.add(key)

    def feasible(self) -> tuple[dict[str, int], int, Counter]:
        """Node -> pods on it (bound and being bound) for the nodes that fit one more pod;
        the number of nodes; why the others do not fit."""
        nodes = self.informers.nodes.items()
        in_flight = Counter(self._bound.values())
        fits: dict[str, int] = {}
        reasons: Counter = Counter()
        for n in nodes:
            name = n.metadata.name
            load = self._load.get(name, 0) + in_flight[name]
            if not node_is_ready(n):
                reasons[NOT_READY] += 1
            elif n.spec.unschedulable:
                reasons[UNSCHEDULABLE] += 1
            elif load >= allocatable_pods(n):
                reasons[TOO_MANY_PODS] += 1
            else:
                fits[name] = load
        return fits, len(nodes), reasons

    async def reconcile(self, key: tuple[str, str]) -> None:
        pod = self.informers.pods.get(*key)
        if pod is None or pod.spec.node_name or pod.metadata.deletion_timestamp or key in self._bound:
            self._unschedulable.discard(key)
            return
        fault.check(pod, "scheduler")
        fits, total, reasons = self.feasible()
        if not fits:
            if key not in self._unschedulable:
                log.info("scheduler: unable to schedule pod %s/%s: %s", *key, fit_error(total, reasons))
            self._unschedulable.add(key)
            self.queue.add_after(key, RETRY_UNSCHEDULABLE)
            await self._mark_unschedulable(pod, fit_error(total, reasons))
            return
        self._unschedulable.discard(key)
        bound = copy_of(pod)
        bound.spec.node_name = min(sorted(fits), key=lambda name: fits[name])
        # Recorded before the write: the informer may deliver the bound pod
        # before update() returns, and that event is what clears the record.
        self._bound[key] = bound.spec.node_name
        # The bind goes out without waiting for it (upstream binds asynchronously too): awaiting
        # each one made scheduling a round trip per pod, ~10 s for a burst of 1,000 pods.
        task = asyncio.create_task(self._bind(key, bound))
        self._binding.add(task)
        task.add_done_callback(self._binding.discard)

    async def _mark_unschedulable(self, pod: pb.Pod, message: str) -> None:
        """PodScheduled=False, reason Unschedulable, as kube-scheduler writes it (once per change)."""
        cond = next((c for c in pod.status.conditions if c.type == "PodScheduled"), None)
        if cond is not None and (cond.status, cond.reason, cond.message) == ("False", "Unschedulable", message):
            return
        update = copy_of(pod)
        cond = next((c for c in update.status.conditions if c.type == "PodScheduled"), None)
        if cond is None:
            cond = update.status.conditions.add(type="PodScheduled")
        if cond.status != "False":
            cond.last_transition_time = now_rfc3339()
        cond.status, cond.reason, cond.message = "False", "Unschedulable", message
        update.status.phase = update.status.phase or "Pending"
        try:
            await self.client.update_status(update)
        except (Conflict, NotFound):
            pass  # changed meanwhile: its event brings the pod back here

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
