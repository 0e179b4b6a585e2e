"""The write path: defaulting, validation, allocation and graceful deletion per kind.

Pure of gRPC: it takes objects and returns the store's events, raising an
ApiError (whose text names the field) before anything is written.
"""

from __future__ import annotations

import random
import uuid

from google.protobuf.message import Message

from testbed.api.kinds import BY_NAME, Kind, kind_of
from testbed.api.meta import copy_of, now_rfc3339
from testbed.api.v1 import api_pb2 as pb
from testbed.apiserver import service_alloc
from testbed.apiserver.allocators import ClusterIPAllocator, PortAllocator
from testbed.apiserver.defaults import apply_defaults
from testbed.api.errors import AlreadyExists, Conflict, Invalid, NotFound
from testbed.apiserver.store import Event, Key, Store
from testbed.apiserver.validation import validate

# Like upstream's names for generated suffixes: no vowels, no look-alike digits.
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class Registry:
    def __init__(self, store: Store, service_cidr: str, node_port_range: str = "30000-32767") -> None:
        self.store = store
        self.cluster_ips = ClusterIPAllocator(service_cidr)
        self.node_ports = PortAllocator.parse(node_port_range)
        self._rng = random.Random()

    def rebuild_allocations(self) -> None:
        """Start the allocators afresh from the store (after a failed commit)."""
        self.cluster_ips = ClusterIPAllocator(str(self.cluster_ips.network))
        self.node_ports = PortAllocator(self.node_ports.low, self.node_ports.high)
        self.load_allocations()

    def load_allocations(self) -> None:
        """Fill the allocators from the stored Services (at start)."""
        for svc in self.store.list("Service"):
            if svc.spec.cluster_ip and svc.spec.cluster_ip != "None":
                self.cluster_ips.allocate(svc.spec.cluster_ip)
            for port in service_alloc.node_ports_of(svc.spec):
                self.node_ports.allocate(port)

    # ------------------------------------------------------------ create

    def create(self, obj: Message, dry_run: bool = False) -> tuple[Message, list[Event]]:
        kind = kind_of(obj)
        obj = copy_of(obj)
        meta = obj.metadata
        self._default_namespace(kind, meta)
        if not meta.name and meta.generate_name:
            meta.name = self._generate_name(kind, meta)
        if self.store.get((kind.name, meta.namespace, meta.name)) is not None:
            raise AlreadyExists(f'{kind.plural} "{meta.name}" already exists')
        meta.uid = str(uuid.uuid4())
        meta.creation_timestamp = now_rfc3339()
        meta.generation = 1
        meta.ClearField("deletion_timestamp")
        meta.ClearField("deletion_grace_period_seconds")
        apply_defaults(kind.name, obj)
        self._check(kind, obj)
        reservation = self._reservation()
        if kind.name == "Service":
            service_alloc.allocate_for_create(obj.spec, reservation)
        return self._finish(kind, obj, reservation, dry_run, lambda: self.store.put(obj))

    # ------------------------------------------------------------ update

    def update(self, obj: Message, subresource: str = "", dry_run: bool = False) -> tuple[Message, list[Event]]:
        kind = kind_of(obj)
        self._default_namespace(kind, obj.metadata)
        old = self.existing(kind, obj.metadata.namespace, obj.metadata.name)
        self._check_version(kind, old, obj.metadata.resource_version)
        if subresource == "status":
            new = copy_of(old)
            new.status.CopyFrom(obj.status)
        elif subresource == "":
            new = self._merge_main(kind, old, obj)
        else:
            raise NotFound(f"the server could not find the requested resource (subresource {subresource!r})")
        self._check(kind, new)
        reservation = self._reservation()
        if kind.name == "Service" and subresource == "":
            service_alloc.allocate_for_update(old.spec, new.spec, reservation)
            if new.spec.type != "LoadBalancer" and new.HasField("status"):
                new.status.ClearField("load_balancer")
        if _spec_of(new) != _spec_of(old):  # after allocation: kept values are no change
            new.metadata.generation = old.metadata.generation + 1
        if new == old:
            reservation.rollback()
            return old, []
        return self._finish(kind, new, reservation, dry_run, lambda: self.store.put(new))

    def _merge_main(self, kind: Kind, old: Message, obj: Message) -> Message:
        new = copy_of(obj)
        meta, old_meta = new.metadata, old.metadata
        for name in ("uid", "creation_timestamp", "deletion_timestamp", "generate_name", "generation",
                     "resource_version"):
            setattr(meta, name, getattr(old_meta, name))
        if old_meta.HasField("deletion_grace_period_seconds"):
            meta.deletion_grace_period_seconds = old_meta.deletion_grace_period_seconds
        if kind.name != "EndpointSlice":  # EndpointSlice has no spec/status split
            new.ClearField("status")
            if old.HasField("status"):
                new.status.CopyFrom(old.status)
        apply_defaults(kind.name, new)
        return new

    # ------------------------------------------------------------ delete

    def delete(
        self, key: Key, grace_period: int | None = None, resource_version: str = ""
    ) -> tuple[Message, list[Event]]:
        kind = BY_NAME[key[0]]
        old = self.existing(kind, key[1], key[2])
        self._check_version(kind, old, resource_version)
        if kind.name == "Pod" and old.spec.node_name:
            grace = old.spec.termination_grace_period_seconds if grace_period is None else grace_period
            if grace > 0:
                return self._begin_graceful_delete(old, grace)
        reservation = self._reservation()
        if kind.name == "Service":
            service_alloc.release_all(old.spec, reservation)
        event = self.store.delete(key)
        reservation.commit()
        return event.obj, [event]

    def _begin_graceful_delete(self, pod: pb.Pod, grace: int) -> tuple[Message, list[Event]]:
        if pod.metadata.deletion_timestamp:
            return pod, []
        new = copy_of(pod)
        new.metadata.deletion_timestamp = now_rfc3339()
        new.metadata.deletion_grace_period_seconds = grace
        event = self.store.put(new)
        return new, [event]

    # ------------------------------------------------------------ helpers

    def _finish(self, kind: Kind, obj: Message, reservation, dry_run: bool, write) -> tuple[Message, list[Event]]:
        if reservation.errors:
            reservation.rollback()
            raise Invalid(kind.name, obj.metadata.name, reservation.errors)
        if dry_run:
            reservation.rollback()
            return obj, []
        try:
            event = write()
        except BaseException:
            reservation.rollback()
            raise
        reservation.commit()
        return event.obj, [event]

    def _reservation(self) -> service_alloc.Reservation:
        return service_alloc.Reservation(self.cluster_ips, self.node_ports)

    @staticmethod
    def _default_namespace(kind: Kind, meta: pb.ObjectMeta) -> None:
        if kind.namespaced:
            meta.namespace = meta.namespace or "default"
        else:
            meta.namespace = ""

    def _generate_name(self, kind: Kind, meta: pb.ObjectMeta) -> str:
        for _ in range(16):
            name = meta.generate_name + random_suffix(self._rng)
            if self.store.get((kind.name, meta.namespace, name)) is None:
                return name
        raise AlreadyExists(f"could not find a free name for generateName {meta.generate_name!r}")

    @staticmethod
    def _check(kind: Kind, obj: Message) -> None:
        errors = validate(kind.name, obj)
        if errors:
            raise Invalid(kind.name, obj.metadata.name, errors)

    def existing(self, kind: Kind, namespace: str, name: str) -> Message:
        old = self.store.get((kind.name, namespace if kind.namespaced else "", name))
        if old is None:
            raise NotFound(f'{kind.plural} "{name}" not found')
        return old

    @staticmethod
    def _check_version(kind: Kind, old: Message, resource_version: str) -> None:
        if resource_version and resource_version != old.metadata.resource_version:
            raise Conflict(
                f'Operation cannot be fulfilled on {kind.plural} "{old.metadata.name}": the object has been '
                "modified; please apply your changes to the latest version and try again"
            )


def _spec_of(obj: Message) -> Message | tuple:
    if isinstance(obj, pb.EndpointSlice):
        return (obj.address_type, list(obj.endpoints), list(obj.ports))
    return obj.spec


def random_suffix(rng: random.Random, length: int = 5) -> str:
    return "".join(rng.choice(_SUFFIX_ALPHABET) for _ in range(length))

