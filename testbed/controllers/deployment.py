"""Deployment -> Pods: keep `replicas` pods of the current template, rolling out template changes.

Pods belong to their Deployment directly (ownerReference), named
<deployment>-<template-hash>-<suffix> like the pods of a ReplicaSet, and carry
the pod-template-hash label that tells the current template from older ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import math

from google.protobuf.message import Message

from testbed import fault
from testbed.api.errors import AlreadyExists, Conflict, NotFound
from testbed.api.kube_json import int_or_string
from testbed.api.meta import copy_of
from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.client.informer import WorkQueue
from testbed.controllers.base import Expectations, Informers, controller_of, owner_ref, pod_is_active, pod_is_ready

HASH_LABEL = "pod-template-hash"
# At most this many pod creates (and deletes) per sync, upstream's BurstReplicas: the next
# sync waits until the informer has shown them (expectations), so `replicas: 100000` fills
# in steps of 500 that the API server, the scheduler and a Deployment's deletion keep up with.
BURST_REPLICAS = 500


def template_hash(template: pb.PodTemplateSpec) -> str:
    digest = hashlib.sha256(template.SerializeToString(deterministic=True)).hexdigest()
    return digest[:10]


def resolve_budget(value: pb.IntOrString, replicas: int, round_up: bool) -> int:
    raw = int_or_string(value)
    if raw is None:
        return 0
    if isinstance(raw, int):
        return raw
    fraction = int(raw.rstrip("%")) * replicas / 100
    return math.ceil(fraction) if round_up else math.floor(fraction)


def deletion_rank(pod: pb.Pod) -> tuple:
    """Pods to remove first: unscheduled, then not ready, then the youngest (as upstream ranks them)."""
    return (bool(pod.spec.node_name), pod_is_ready(pod), pod.metadata.creation_timestamp)


class DeploymentController:
    def __init__(self, client: ApiClient, informers: Informers) -> None:
        self.client = client
        self.informers = informers
        self.queue = WorkQueue()
        self.expectations = Expectations()
        informers.deployments.on_change(self._on_deployment)
        informers.pods.on_change(self._on_pod)

    def _on_deployment(self, _type: str, old: Message | None, new: Message | None) -> None:
        obj = new or old
        self.queue.add((obj.metadata.namespace, obj.metadata.name))

    def _on_pod(self, event_type: str, old: Message | None, new: Message | None) -> None:
        pod = new or old
        owner = controller_of(pod)
        if owner is None or owner.kind != "Deployment":
            return
        key = (pod.metadata.namespace, owner.name)
        if event_type == "ADDED":
            self.expectations.observed_create(key)
        if new is None or new.metadata.deletion_timestamp:
            self.expectations.observed_delete(key, pod.metadata.name)
        self.queue.add(key)

    def owned_pods(self, deploy: pb.Deployment) -> list[pb.Pod]:
        return [
            p
            for p in self.informers.pods.items()
            if p.metadata.namespace == deploy.metadata.namespace
            and (owner := controller_of(p)) is not None
            and owner.uid == deploy.metadata.uid
        ]

    async def reconcile(self, key: tuple[str, str]) -> None:
        namespace, name = key
        deploy = self.informers.deployments.get(namespace, name)
        if deploy is None:
            self.expectations.forget(key)
            return
        fault.check(deploy, "deployment")
        if not self.expectations.satisfied(key):
            self.queue.add_after(key, 0.2)
            return
        pods = self.owned_pods(deploy)
        current = template_hash(deploy.spec.template)
        active = [p for p in pods if pod_is_active(p)]
        new = [p for p in active if p.metadata.labels.get(HASH_LABEL) == current]
        old = [p for p in active if p.metadata.labels.get(HASH_LABEL) != current]
        to_create, to_delete = self._plan(deploy, new, old, terminating_old=len(pods) - len(active))
        to_create = min(to_create, BURST_REPLICAS)
        to_delete = to_delete[:BURST_REPLICAS]
        self.expectations.expect(key, to_create, {p.metadata.name for p in to_delete})
        if not await self._create_pods(key, deploy, current, to_create):
            return
        for pod in to_delete:
            try:
                await self.client.delete("Pod", pod.metadata.name, namespace)
            except NotFound:
                self.expectations.observed_delete(key, pod.metadata.name)
        await self._write_status(deploy, new, active)

    async def _create_pods(self, key: tuple[str, str], deploy: pb.Deployment, current: str, count: int) -> bool:
        """Create `count` pods in batches of 1, 2, 4, ... (upstream's slow start); False if it stopped early.

        One create at a time waited a round trip per pod (1,000 replicas: 25 s); concurrent ones
        share the client's write stream and the server's transactions. A failed batch stops the
        rest (raised: the key is retried with back-off), and so does the Deployment's deletion,
        seen between two batches: its pods would only be garbage.
        """
        done, batch = 0, 1
        while done < count:
            if not self._still_wanted(deploy):
                self._unexpect(key, count - done)
                return False
            size = min(batch, count - done)
            results = await asyncio.gather(*(self._create_pod(deploy, current) for _ in range(size)),
                                           return_exceptions=True)
            done += size
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                self._unexpect(key, len(errors) + count - done)
                raise errors[0]
            batch *= 2
        return True

    def _still_wanted(self, deploy: pb.Deployment) -> bool:
        cached = self.informers.deployments.get(deploy.metadata.namespace, deploy.metadata.name)
        return cached is not None and cached.metadata.uid == deploy.metadata.uid and not cached.metadata.deletion_timestamp

    def _unexpect(self, key: tuple[str, str], creates: int) -> None:
        """Creates that will never be seen: not sent, or refused."""
        for _ in range(creates):
            self.expectations.observed_create(key)

    def _plan(self, deploy: pb.Deployment, new: list[pb.Pod], old: list[pb.Pod], terminating_old: int):
        desired = deploy.spec.replicas
        if deploy.spec.strategy.type == "Recreate" and old:
            return 0, old
        if deploy.spec.strategy.type == "Recreate" and terminating_old:
            return 0, []  # wait until the old pods are gone
        if not old:
            if len(new) < desired:
                return desired - len(new), []
            if len(new) == desired:
                return 0, []  # (not sorting 1,000 pods to delete none, on every pod event)
            return 0, sorted(new, key=deletion_rank)[: len(new) - desired]
        rolling = deploy.spec.strategy.rolling_update
        surge = resolve_budget(rolling.max_surge, desired, round_up=True)
        unavailable = resolve_budget(rolling.max_unavailable, desired, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        to_create = max(0, min(desired - len(new), desired + surge - len(new) - len(old)))
        # Old pods may go while the ready pods stay at or above desired - maxUnavailable
        # (upstream's maxScaledDown); unscheduled and unready ones go first.
        unready_new = sum(not pod_is_ready(p) for p in new)
        removable = max(0, len(new) + len(old) - (desired - unavailable) - unready_new)
        return to_create, sorted(old, key=deletion_rank)[:removable]

    async def _create_pod(self, deploy: pb.Deployment, current_hash: str) -> str:
        pod = pb.Pod()
        pod.metadata.CopyFrom(deploy.spec.template.metadata)
        pod.metadata.namespace = deploy.metadata.namespace
        pod.metadata.generate_name = f"{deploy.metadata.name}-{current_hash[:5]}-"
        pod.metadata.labels[HASH_LABEL] = current_hash
        pod.metadata.owner_references.append(owner_ref(deploy, "Deployment", "apps/v1"))
        pod.spec.CopyFrom(deploy.spec.template.spec)
        for _ in range(3):
            try:
                return (await self.client.create(pod)).metadata.name
            except AlreadyExists:
                continue
        raise AlreadyExists(f"could not name a new pod for deployment {deploy.metadata.name}")

    async def _write_status(self, deploy: pb.Deployment, new: list[pb.Pod], active: list[pb.Pod]) -> None:
        ready = sum(pod_is_ready(p) for p in active)
        status = pb.DeploymentStatus(
            observed_generation=deploy.metadata.generation,
            replicas=len(active),
            updated_replicas=len(new),
            ready_replicas=ready,
            available_replicas=ready,
            unavailable_replicas=max(0, deploy.spec.replicas - ready),
        )
        if status == deploy.status:
            return
        update = copy_of(deploy)
        update.status.CopyFrom(status)
        try:
            await self.client.update_status(update)
        except (Conflict, NotFound):
            self.queue.add_after((deploy.metadata.namespace, deploy.metadata.name), 0.1)
