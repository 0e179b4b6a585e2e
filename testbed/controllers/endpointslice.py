"""EndpointSlice controller: Service selector x Pods -> EndpointSlices.

As upstream: one slice per distinct set of resolved ports (a named targetPort
may resolve to different numbers on different pods), at most 100 endpoints a
slice; endpoints carry ready / serving / terminating, nodeName and targetRef.
Services without a selector are left alone: their slices come from the user.
"""

from __future__ import annotations

import time

from google.protobuf.message import Message

from testbed import fault
from testbed.api.errors import Conflict, NotFound
from testbed.api.kube_json import int_or_string
from testbed.api.meta import LAST_CHANGE_TRIGGER_TIME, SERVICE_NAME_LABEL, copy_of, rfc3339_precise
from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.client.informer import WorkQueue
from testbed.controllers.base import Informers, owner_ref, pod_is_ready

MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.svclab.io"
MAX_ENDPOINTS_PER_SLICE = 100

PortSet = tuple[tuple[str, str, int], ...]  # (name, protocol, port) per Service port


def resolve_ports(svc: pb.Service, pod: pb.Pod) -> PortSet | None:
    """The pod's port for each Service port; None if a named targetPort is missing on the pod."""
    out = []
    for port in svc.spec.ports:
        target = int_or_string(port.target_port)
        if isinstance(target, str):
            number = next(
                (
                    p.container_port
                    for c in pod.spec.containers
                    for p in c.ports
                    if p.name == target and p.protocol == port.protocol
                ),
                None,
            )
            if number is None:
                return None
        else:
            number = target
        out.append((port.name, port.protocol, number))
    return tuple(out)


def endpoint_of(pod: pb.Pod) -> pb.Endpoint:
    terminating = bool(pod.metadata.deletion_timestamp)
    ready = pod_is_ready(pod)
    ep = pb.Endpoint(addresses=[pod.status.pod_ip], node_name=pod.spec.node_name)
    ep.conditions.ready = ready and not terminating
    ep.conditions.serving = ready
    ep.conditions.terminating = terminating
    ep.target_ref.CopyFrom(
        pb.ObjectReference(kind="Pod", namespace=pod.metadata.namespace, name=pod.metadata.name, uid=pod.metadata.uid)
    )
    return ep


def selects(svc: pb.Service, pod: pb.Pod) -> bool:
    selector = svc.spec.selector
    return bool(selector) and pod.metadata.namespace == svc.metadata.namespace and all(
        pod.metadata.labels.get(k) == v for k, v in selector.items()
    )


def desired_slices(svc: pb.Service, pods: list[pb.Pod]) -> list[tuple[PortSet, list[pb.Endpoint]]]:
    groups: dict[PortSet, list[pb.Endpoint]] = {}
    for pod in sorted(pods, key=lambda p: p.status.pod_ip):
        if not pod.status.pod_ip or pod.status.phase in ("Succeeded", "Failed") or not selects(svc, pod):
            continue
        ports = resolve_ports(svc, pod)
        if ports is not None:
            groups.setdefault(ports, []).append(endpoint_of(pod))
    if not groups:
        return [((), [])]  # one empty slice, as upstream keeps for a Service with no endpoints
    out = []
    for ports, endpoints in sorted(groups.items()):
        for start in range(0, len(endpoints), MAX_ENDPOINTS_PER_SLICE):
            out.append((ports, endpoints[start : start + MAX_ENDPOINTS_PER_SLICE]))
    return out


class EndpointSliceController:
    def __init__(self, client: ApiClient, informers: Informers) -> None:
        self.client = client
        self.informers = informers
        self.queue = WorkQueue()
        # Slices this controller wrote, by name, with the revision written: the
        # cache is stale for a Service until it shows at least those revisions.
        self._written: dict[tuple[str, str], dict[str, int]] = {}
        # Per Service, when the oldest change not yet written to its slices was seen: the
        # slices' last-change-trigger-time (upstream keeps the pods' and Service's own times;
        # this is when the change reached this controller, a few ms after the API write).
        self._triggered: dict[tuple[str, str], float] = {}
        informers.services.on_change(self._on_service)
        informers.pods.on_change(self._on_pod)
        informers.slices.on_change(self._on_slice)

    def _changed(self, key: tuple[str, str]) -> None:
        self._triggered.setdefault(key, time.time())
        self.queue.add(key)

    def _on_service(self, _type: str, old: Message | None, new: Message | None) -> None:
        svc = new or old
        self._changed((svc.metadata.namespace, svc.metadata.name))

    def _on_pod(self, _type: str, old: Message | None, new: Message | None) -> None:
        for svc in self.informers.services.items():
            if (old is not None and selects(svc, old)) or (new is not None and selects(svc, new)):
                self._changed((svc.metadata.namespace, svc.metadata.name))

    def _on_slice(self, _type: str, old: Message | None, new: Message | None) -> None:
        eps = new or old
        service = eps.metadata.labels.get(SERVICE_NAME_LABEL)
        if service and eps.metadata.labels.get(MANAGED_BY_LABEL) == MANAGED_BY:
            self.queue.add((eps.metadata.namespace, service))

    def _current_slices(self, namespace: str, service: str) -> list[pb.EndpointSlice] | None:
        """Our slices of the Service, or None while the cache lags behind our own writes."""
        slices = [
            s
            for s in self.informers.slices.items()
            if s.metadata.namespace == namespace
            and s.metadata.labels.get(SERVICE_NAME_LABEL) == service
            and s.metadata.labels.get(MANAGED_BY_LABEL) == MANAGED_BY
        ]
        written = self._written.get((namespace, service), {})
        by_name = {s.metadata.name: s for s in slices}
        for name, revision in written.items():
            cached = by_name.get(name)
            if revision < 0 and cached is not None:  # deleted by us, still cached
                return None
            if revision > 0 and (cached is None or int(cached.metadata.resource_version) < revision):
                return None
        return slices

    async def reconcile(self, key: tuple[str, str]) -> None:
        triggered = self._triggered.pop(key, None)
        done = False
        try:
            done = await self._reconcile(key, triggered)
        finally:
            if not done and triggered is not None:  # tried again later: the change is still pending
                self._triggered[key] = min(triggered, self._triggered.get(key, triggered))

    async def _reconcile(self, key: tuple[str, str], triggered: float | None) -> bool:
        """Bring the Service's slices to what its pods say; False if it must be tried again."""
        namespace, name = key
        svc = self.informers.services.get(namespace, name)
        fault.check(svc, "endpointslice")
        current = self._current_slices(namespace, name)
        if current is None:
            self.queue.add_after(key, 0.05)
            return False
        written: dict[str, int] = {}
        if svc is None or not svc.spec.selector:
            for eps in current:  # the Service went or lost its selector: our slices go too
                await self._delete(eps, written)
            self._written[key] = written
            return True
        pods = [p for p in self.informers.pods.items() if p.metadata.namespace == namespace]
        unused = sorted(current, key=lambda s: s.metadata.name)
        for ports, endpoints in desired_slices(svc, pods):
            want = self._slice(svc, ports, endpoints)
            if triggered is not None:
                want.metadata.annotations[LAST_CHANGE_TRIGGER_TIME] = rfc3339_precise(triggered)
            # Prefer the slice with the same ports; else reuse any leftover slice.
            match = next((s for s in unused if list(s.ports) == list(want.ports)), unused[0] if unused else None)
            if match is None:
                created = await self.client.create(want)
                written[created.metadata.name] = int(created.metadata.resource_version)
                continue
            unused.remove(match)
            update = copy_of(match)
            for field in ("ports", "endpoints"):
                update.ClearField(field)
            update.ports.extend(want.ports)
            update.endpoints.extend(want.endpoints)
            update.metadata.labels.clear()
            update.metadata.labels.update(want.metadata.labels)
            if update == match:
                continue
            if triggered is not None:
                update.metadata.annotations[LAST_CHANGE_TRIGGER_TIME] = want.metadata.annotations[LAST_CHANGE_TRIGGER_TIME]
            try:
                updated = await self.client.update(update)
            except Conflict:
                self.queue.add_after(key, 0.05)
                return False
            written[updated.metadata.name] = int(updated.metadata.resource_version)
        for eps in unused:
            await self._delete(eps, written)
        self._written[key] = written
        return True

    async def _delete(self, eps: pb.EndpointSlice, written: dict[str, int]) -> None:
        try:
            await self.client.delete("EndpointSlice", eps.metadata.name, eps.metadata.namespace)
        except NotFound:
            return
        written[eps.metadata.name] = -1

    @staticmethod
    def _slice(svc: pb.Service, ports: PortSet, endpoints: list[pb.Endpoint]) -> pb.EndpointSlice:
        eps = pb.EndpointSlice(address_type="IPv4")
        eps.metadata.namespace = svc.metadata.namespace
        eps.metadata.generate_name = f"{svc.metadata.name}-"
        eps.metadata.labels[SERVICE_NAME_LABEL] = svc.metadata.name
        eps.metadata.labels[MANAGED_BY_LABEL] = MANAGED_BY
        eps.metadata.owner_references.append(owner_ref(svc, "Service", "v1"))
        for port_name, protocol, number in ports:
            eps.ports.add(name=port_name, protocol=protocol, port=number)
        eps.endpoints.extend(endpoints)
        return eps

