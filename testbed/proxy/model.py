"""The desired state of a node's Service proxy, shared by every backend.

What upstream kube-proxy keeps in pkg/proxy (serviceport.go, endpoint.go, topology.go and the
two change trackers), reduced to what svclab needs. Data flows one way:

    Service / EndpointSlice events -> ChangeTracker -> ProxyState -> a backend's render()

- `ServicePortName` names one port of one Service ("ns/name:port", as upstream prints it).
- `ServicePort` is what a backend needs to know about that port; `Endpoint` one backend pod as
  seen from this node (`is_local`). Both are frozen, so comparing old and new tells whether
  anything changed.
- `ProxyState` maps each ServicePortName to its ServicePort and to its endpoints, sorted by
  "ip:port" as upstream sorts them.
- `categorize_endpoints()` picks the endpoints each traffic policy uses (upstream's
  CategorizeEndpoints without topology hints, which svclab does not have).
- `ChangeTracker` takes the informers' (type, old, new) events, keeps a ProxyState current and
  tells, at each `take()`, which ServicePortNames changed since the previous one. No-op updates
  (a resync, a status write, A -> B -> A between two takes) change nothing, so they report
  nothing: the set drives partial syncs.

IPv4 only, like the rest of svclab: IPv6 addresses and slices are ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Collection, Iterable, NamedTuple

from google.protobuf.message import Message

from testbed import fault
from testbed.api.meta import LAST_CHANGE_TRIGGER_TIME, SERVICE_NAME_LABEL, parse_rfc3339
from testbed.api.v1 import api_pb2 as pb

# Label that ties an EndpointSlice to its Service (testbed.controllers.endpointslice writes it).
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, the API default for sessionAffinity ClientIP
# Failure injection: a Service annotated `svclab.io/fault: invalid-rules` gets one rule the
# kernel refuses (a jump to a chain that does not exist), to watch kube-proxy isolate it.
FAULT_ANNOTATION = "svclab.io/fault"
FAULT_INVALID_RULES = "invalid-rules"
MISSING_CHAIN = "svclab-fault-no-such-chain"

ServiceKey = tuple[str, str]  # (namespace, name) of a Service
SliceKey = tuple[str, str]  # (namespace, name) of an EndpointSlice


class ServicePortName(NamedTuple):
    """One port of one Service. str() is upstream's: "ns/name:port", or "ns/name" for an unnamed port."""

    namespace: str
    name: str
    port_name: str
    protocol: str  # "TCP", "UDP" or "SCTP", as in the API

    def __str__(self) -> str:
        if self.port_name:
            return f"{self.namespace}/{self.name}:{self.port_name}"
        return f"{self.namespace}/{self.name}"

    @property
    def service(self) -> ServiceKey:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServicePort:
    """What a proxy needs to know about one Service port (upstream's BaseServicePortInfo)."""

    name: ServicePortName
    cluster_ip: str
    port: int
    protocol: str
    node_port: int = 0  # 0: none
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip
    load_balancer_source_ranges: tuple[str, ...] = ()
    external_policy_local: bool = False  # externalTrafficPolicy Local on an externally reachable Service
    internal_policy_local: bool = False  # internalTrafficPolicy Local
    session_affinity_timeout: int | None = None  # seconds; None: no ClientIP affinity
    health_check_node_port: int = 0  # 0: none (only LoadBalancer + externalTrafficPolicy Local)
    target_port: int | str = 0  # for reference: the endpoints carry the resolved port
    invalid_rule: bool = False  # annotation svclab.io/fault: invalid-rules (a lab's broken Service)

    @property
    def externally_accessible(self) -> bool:
        """Reachable by NodePort, a LoadBalancer IP or an external IP."""
        return bool(self.node_port or self.load_balancer_ips or self.external_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        """Cluster-wide endpoints are needed: internal policy Cluster, or any external access
        (even with external policy Local, pods and the node itself are short-circuited to them)."""
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or (self.external_policy_local and self.externally_accessible)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a ServicePortName, from this node's point of view (upstream's BaseEndpointInfo)."""

    ip: str
    port: int
    node_name: str = ""
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    is_local: bool = False
    addr: str = field(init=False, repr=False, compare=False)  # "ip:port", upstream's Endpoint.String()

    def __post_init__(self) -> None:
        object.__setattr__(self, "addr", f"{self.ip}:{self.port}")

    def __str__(self) -> str:
        return self.addr


class EndpointSelection(NamedTuple):
    """The endpoints each traffic policy of one ServicePort sends to (upstream's CategorizeEndpoints)."""

    cluster: tuple[Endpoint, ...]  # for Cluster policy (and short-circuited traffic)
    local: tuple[Endpoint, ...]  # for Local policy: this node's endpoints only
    all_reachable: tuple[Endpoint, ...]  # union of the two: each needs its own endpoint chain
    has_any: bool  # some usable endpoint exists anywhere in the cluster


# ------------------------------------------------------------------ building from API objects


def _is_ipv4(address: str) -> bool:
    return ":" not in address


def build_service_ports(service: pb.Service) -> list[ServicePort]:
    """The ports a proxy programs for a Service; none for headless or IP-less Services."""
    spec = service.spec
    cluster_ip = spec.cluster_ip or (spec.cluster_ips[0] if spec.cluster_ips else "")
    if not cluster_ip or cluster_ip == "None" or not _is_ipv4(cluster_ip):
        return []
    svc_type = spec.type or "ClusterIP"
    external_ips = tuple(ip for ip in spec.external_ips if ip and _is_ipv4(ip))
    lb_ips = tuple(i.ip for i in service.status.load_balancer.ingress if i.ip and _is_ipv4(i.ip))
    source_ranges = tuple(r.strip() for r in spec.load_balancer_source_ranges if r.strip() and _is_ipv4(r))
    has_node_ports = svc_type in ("NodePort", "LoadBalancer")
    # apiservice.ExternallyAccessible: external policy only means something for such Services.
    externally_accessible = has_node_ports or (svc_type == "ClusterIP" and bool(external_ips))
    external_local = externally_accessible and spec.external_traffic_policy == "Local"
    affinity = None
    if spec.session_affinity == "ClientIP":
        client_ip = spec.session_affinity_config.client_ip
        affinity = client_ip.timeout_seconds if client_ip.HasField("timeout_seconds") else DEFAULT_AFFINITY_TIMEOUT
    health_check = spec.health_check_node_port if svc_type == "LoadBalancer" and external_local else 0
    invalid_rule = service.metadata.annotations.get(FAULT_ANNOTATION) == FAULT_INVALID_RULES
    ports = []
    for port in spec.ports:
        protocol = port.protocol or "TCP"
        which = port.target_port.WhichOneof("value")
        ports.append(ServicePort(
            name=ServicePortName(service.metadata.namespace, service.metadata.name, port.name, protocol),
            cluster_ip=cluster_ip,
            port=port.port,
            protocol=protocol,
            node_port=port.node_port if has_node_ports else 0,
            external_ips=external_ips,
            load_balancer_ips=lb_ips,
            load_balancer_source_ranges=source_ranges,
            external_policy_local=external_local,
            internal_policy_local=spec.internal_traffic_policy == "Local",
            session_affinity_timeout=affinity,
            health_check_node_port=health_check,
            target_port=getattr(port.target_port, which) if which else port.port,
            invalid_rule=invalid_rule,
        ))
    return ports


def slice_service(eps: pb.EndpointSlice) -> ServiceKey | None:
    """The Service an EndpointSlice belongs to, from its kubernetes.io/service-name label."""
    name = eps.metadata.labels.get(SERVICE_NAME_LABEL)
    return (eps.metadata.namespace, name) if name else None


def slice_endpoints(eps: pb.EndpointSlice, node_name: str) -> dict[ServicePortName, tuple[Endpoint, ...]]:
    """What one slice contributes, per ServicePortName (its ports resolved by name and protocol).

    As upstream's EndpointSliceCache: ports without a number are skipped; each endpoint uses
    its first address; unset ready / serving mean true, unset terminating false.
    """
    service = slice_service(eps)
    if service is None or eps.address_type not in ("", "IPv4"):
        return {}
    endpoints = []
    for ep in eps.endpoints:
        if not ep.addresses:
            continue
        c = ep.conditions
        endpoints.append((
            ep.addresses[0],
            ep.node_name,
            not c.HasField("ready") or c.ready,
            not c.HasField("serving") or c.serving,
            c.HasField("terminating") and c.terminating,
        ))
    out: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for port in eps.ports:
        if not port.HasField("port") or port.port <= 0:
            continue
        spn = ServicePortName(service[0], service[1], port.name, port.protocol or "TCP")
        out[spn] = tuple(
            Endpoint(ip, port.port, node, ready, serving, terminating, bool(node_name) and node == node_name)
            for ip, node, ready, serving, terminating in endpoints
        )
    return out


def merge_endpoints(parts: Iterable[Iterable[Endpoint]]) -> tuple[Endpoint, ...]:
    """One ServicePortName's endpoints from all its slices: one per "ip:port" (a ready copy wins
    over a not-ready one), sorted by "ip:port" as upstream sorts them."""
    by_addr: dict[str, Endpoint] = {}
    for part in parts:
        for ep in part:
            seen = by_addr.get(ep.addr)
            if seen is None or (ep.ready and not seen.ready):
                by_addr[ep.addr] = ep
    return tuple(by_addr[a] for a in sorted(by_addr))


def build_endpoints(service_port_name: ServicePortName, slices: Iterable[pb.EndpointSlice],
                    node_name: str) -> list[Endpoint]:
    """The endpoints of one ServicePortName from the slices of its Service (others are ignored)."""
    return list(merge_endpoints(
        slice_endpoints(eps, node_name).get(service_port_name, ())
        for eps in slices
        if slice_service(eps) == service_port_name.service
    ))


# ------------------------------------------------------------------ endpoint selection


def _ready(ep: Endpoint) -> bool:
    return ep.ready


def _serving_terminating(ep: Endpoint) -> bool:
    return ep.serving and ep.terminating


def categorize_endpoints(sp: ServicePort, endpoints: Iterable[Endpoint]) -> EndpointSelection:
    """Which endpoints Cluster and Local traffic policies use, as upstream's CategorizeEndpoints.

    Cluster: the ready endpoints; if none is ready, the serving terminating ones (so that a
    rolling update of the last pods does not blackhole traffic). Local: the same choice made
    among this node's endpoints alone. Lists are empty for a policy the ServicePort does not use.
    """
    endpoints = tuple(endpoints)
    cluster: tuple[Endpoint, ...] = ()
    has_any = False
    if sp.uses_cluster_endpoints:
        cluster = tuple(filter(_ready, endpoints)) or tuple(filter(_serving_terminating, endpoints))
        has_any = bool(cluster)
    if not sp.uses_local_endpoints:
        return EndpointSelection(cluster, (), cluster, has_any)
    has_any = has_any or any(ep.ready or _serving_terminating(ep) for ep in endpoints)
    mine = [ep for ep in endpoints if ep.is_local]
    local = tuple(filter(_ready, mine))
    terminating_fallback = not local
    if terminating_fallback:
        local = tuple(filter(_serving_terminating, mine))
    if not sp.uses_cluster_endpoints:
        return EndpointSelection((), local, local, has_any)
    if not terminating_fallback:  # every ready local endpoint is already among the cluster ones
        return EndpointSelection(cluster, local, cluster, has_any)
    seen = {ep.addr for ep in cluster}
    return EndpointSelection(cluster, local, cluster + tuple(ep for ep in local if ep.addr not in seen), has_any)


class TrafficPlan(NamedTuple):
    """Where each kind of traffic of one ServicePort goes, the same for every backend.

    internal (ClusterIP) and external (NodePort, LoadBalancer, external IPs) traffic each go
    to the local endpoints when their policy is Local, else to the cluster-wide ones; the
    has_* flags say whether that set is non-empty (else: reject, or drop for Local).
    """

    selection: EndpointSelection
    internal_local: bool
    has_internal: bool
    external_local: bool
    has_external: bool
    uses_cluster: bool  # the cluster-wide endpoints chain is needed
    uses_local: bool  # the local endpoints chain is needed
    uses_external: bool  # the external-traffic entry chain is needed


def plan_traffic(sp: ServicePort, endpoints: Iterable[Endpoint]) -> TrafficPlan:
    selection = categorize_endpoints(sp, endpoints)
    local, has_any = bool(selection.local), selection.has_any
    return TrafficPlan(
        selection,
        internal_local=sp.internal_policy_local,
        has_internal=local if sp.internal_policy_local else has_any,
        external_local=sp.external_policy_local,
        has_external=local if sp.external_policy_local else has_any,
        uses_cluster=bool(selection.cluster) and sp.uses_cluster_endpoints,
        uses_local=local and sp.uses_local_endpoints,
        uses_external=has_any and sp.externally_accessible,
    )


# ------------------------------------------------------------------ state and change tracking


@dataclass
class ProxyState:
    """Desired state of one node's proxy: every ServicePort, and every ServicePortName's endpoints.

    `endpoints` may hold names whose Service is gone or not yet seen; backends render only
    what is in `services`.
    """

    node_name: str = ""
    services: dict[ServicePortName, ServicePort] = field(default_factory=dict)
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = field(default_factory=dict)

    @classmethod
    def from_objects(cls, services: Iterable[pb.Service], slices: Iterable[pb.EndpointSlice],
                     node_name: str) -> ProxyState:
        return ChangeTracker.from_objects(services, slices, node_name).state

    def without(self, names: Collection[ServicePortName]) -> ProxyState:
        """The same state less some ServicePorts, which then get no rules at all."""
        if not names:
            return self
        return ProxyState(self.node_name, {n: sp for n, sp in self.services.items() if n not in names}, self.endpoints)

    def only(self, names: Iterable[ServicePortName]) -> ProxyState:
        """The same state with only some ServicePorts."""
        return ProxyState(self.node_name, {n: self.services[n] for n in names if n in self.services}, self.endpoints)

    def endpoints_of(self, name: ServicePortName) -> tuple[Endpoint, ...]:
        return self.endpoints.get(name, ())

    def categorize(self, name: ServicePortName) -> EndpointSelection:
        return categorize_endpoints(self.services[name], self.endpoints.get(name, ()))


_Contribution = tuple[ServiceKey, dict[ServicePortName, tuple[Endpoint, ...]]]


class ChangeTracker:
    """Collects Service and EndpointSlice events; `take()` applies them to `state` and returns
    the ServicePortNames whose ServicePort or endpoints differ from the previous take().

    `on_service` / `on_slice` have the informers' handler signature (type, old, new), so they
    can be registered directly: `informers.services.on_change(tracker.on_service)`. Only the
    latest object per key is kept until take() (derived at once, the message is not retained),
    and take() compares against what was applied last, so any sequence of events that ends
    where it started reports nothing. Not thread-safe: feed it from the informers' loop.
    """

    def __init__(self, node_name: str) -> None:
        self.state = ProxyState(node_name)
        self.started = time.time()
        # last-change-trigger-time of the slice events the last take() applied (those after
        # this tracker started): kube-proxy's network programming latency starts there
        self.applied_trigger_times: list[float] = []
        self._pending_trigger_times: list[float] = []
        self._pending_services: dict[ServiceKey, dict[ServicePortName, ServicePort]] = {}
        self._pending_slices: dict[SliceKey, _Contribution | None] = {}
        self._service_ports: dict[ServiceKey, dict[ServicePortName, ServicePort]] = {}
        self._slices: dict[SliceKey, _Contribution] = {}
        self._slices_by_service: dict[ServiceKey, dict[SliceKey, dict[ServicePortName, tuple[Endpoint, ...]]]] = {}

    @classmethod
    def from_objects(cls, services: Iterable[pb.Service], slices: Iterable[pb.EndpointSlice],
                     node_name: str) -> ChangeTracker:
        """A tracker that has seen and applied these objects."""
        tracker = cls(node_name)
        for svc in services:
            tracker.on_service("ADDED", None, svc)
        for eps in slices:
            tracker.on_slice("ADDED", None, eps)
        tracker.take()
        return tracker

    @property
    def pending(self) -> bool:
        """Events arrived since the last take() (they may still turn out to be no-ops)."""
        return bool(self._pending_services or self._pending_slices)

    def on_service(self, _type: str, old: Message | None, new: Message | None) -> None:
        fault.check(new, "kube-proxy")
        svc = new if new is not None else old
        key = (svc.metadata.namespace, svc.metadata.name)
        self._pending_services[key] = {sp.name: sp for sp in build_service_ports(new)} if new is not None else {}

    def on_slice(self, _type: str, old: Message | None, new: Message | None) -> None:
        fault.check(new, "kube-proxy")
        eps = new if new is not None else old
        key = (eps.metadata.namespace, eps.metadata.name)
        service = slice_service(new) if new is not None else None
        if service is None:
            self._pending_slices[key] = None
        else:
            self._pending_slices[key] = (service, slice_endpoints(new, self.state.node_name))
            triggered = parse_rfc3339(new.metadata.annotations.get(LAST_CHANGE_TRIGGER_TIME, ""))
            if triggered is not None and triggered >= self.started:
                self._pending_trigger_times.append(triggered)

    def take(self) -> set[ServicePortName]:
        """Apply the pending events to `state`; the ServicePortNames that really changed."""
        changed: set[ServicePortName] = set()
        pending_services, self._pending_services = self._pending_services, {}
        pending_slices, self._pending_slices = self._pending_slices, {}
        self.applied_trigger_times, self._pending_trigger_times = self._pending_trigger_times, []
        services = self.state.services
        for key, ports in pending_services.items():
            old = self._service_ports.pop(key, {})
            if ports:
                self._service_ports[key] = ports
            for name in old.keys() | ports.keys():
                now = ports.get(name)
                if old.get(name) != now:
                    changed.add(name)
                    if now is None:
                        del services[name]
                    else:
                        services[name] = now
        touched: dict[ServiceKey, set[ServicePortName]] = {}
        for key, contribution in pending_slices.items():
            before = self._slices.pop(key, None)
            if before is not None:
                service, ports = before
                by_slice = self._slices_by_service[service]
                del by_slice[key]
                if not by_slice:
                    del self._slices_by_service[service]
                touched.setdefault(service, set()).update(ports)
            if contribution is not None:
                service, ports = contribution
                self._slices[key] = contribution
                self._slices_by_service.setdefault(service, {})[key] = ports
                touched.setdefault(service, set()).update(ports)
        endpoints = self.state.endpoints
        for service, names in touched.items():
            parts = self._slices_by_service.get(service, {}).values()
            for name in names:
                merged = merge_endpoints(p[name] for p in parts if name in p)
                if merged != endpoints.get(name, ()):
                    changed.add(name)
                    if merged:
                        endpoints[name] = merged
                    else:
                        del endpoints[name]
        return changed
