"""What the controllers share: informers over every kind and a little pod/node vocabulary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from google.protobuf.message import Message

from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.client.informer import Informer


@dataclass
class Informers:
    nodes: Informer
    pods: Informer
    deployments: Informer
    services: Informer
    slices: Informer

    @classmethod
    def create(cls, client: ApiClient) -> "Informers":
        return cls(
            Informer(client, "Node"),
            Informer(client, "Pod"),
            Informer(client, "Deployment"),
            Informer(client, "Service"),
            Informer(client, "EndpointSlice"),
        )

    def all(self) -> list[Informer]:
        return [self.nodes, self.pods, self.deployments, self.services, self.slices]


def pod_is_ready(pod: pb.Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)


def pod_is_active(pod: pb.Pod) -> bool:
    """Counts toward its owner's replicas: not terminating and not finished."""
    return not pod.metadata.deletion_timestamp and pod.status.phase not in ("Succeeded", "Failed")


def node_is_ready(node: pb.Node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


def controller_of(obj: Message) -> pb.OwnerReference | None:
    return next((o for o in obj.metadata.owner_references if o.controller), None)


def owner_ref(owner: Message, kind: str, api_version: str) -> pb.OwnerReference:
    return pb.OwnerReference(
        api_version=api_version, kind=kind, name=owner.metadata.name, uid=owner.metadata.uid, controller=True
    )


@dataclass
class Expectations:
    """Writes a controller is making that its informer has not shown it yet (client-go's expectations).

    Recorded before the writes are sent, because the informer may deliver the
    resulting events before the write call returns. Until they are seen,
    reconciling from the cache would act twice; after `ttl` seconds they are
    given up on, so a lost event cannot wedge a key.
    """

    ttl: float = 10.0
    _creates: dict[object, int] = field(default_factory=dict)
    _deletes: dict[object, set[str]] = field(default_factory=dict)
    _since: dict[object, float] = field(default_factory=dict)

    def expect(self, key: object, creates: int = 0, deletes: set[str] = frozenset()) -> None:
        self._creates[key] = self._creates.get(key, 0) + creates
        self._deletes.setdefault(key, set()).update(deletes)
        self._since[key] = time.monotonic()

    def observed_create(self, key: object) -> None:
        if self._creates.get(key, 0) > 0:
            self._creates[key] -= 1

    def observed_delete(self, key: object, name: str) -> None:
        self._deletes.get(key, set()).discard(name)

    def satisfied(self, key: object) -> bool:
        if not self._creates.get(key) and not self._deletes.get(key):
            return True
        if time.monotonic() - self._since.get(key, 0) > self.ttl:
            self.forget(key)
            return True
        return False

    def forget(self, key: object) -> None:
        self._creates.pop(key, None)
        self._deletes.pop(key, None)
        self._since.pop(key, None)
