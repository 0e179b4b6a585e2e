"""What IPVS mode programs for one ServicePort: pure, from the shared model.

As upstream's syncProxyRules loop in pkg/proxy/ipvs: a virtual service on the ClusterIP, on each
external IP, on each LoadBalancer IP and on each NodePort address; the real servers of each are
the endpoints its traffic policy picks (Local: this node's, and the cluster's when there is no
local one, as upstream since kubernetes#97081: where iptables mode drops, IPVS mode forwards
without masquerading); the ipset entries its iptables rules match; the addresses kube-ipvs0
must hold. `plan_service()` computes it; a backend diffs two plans to change only what differs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import NamedTuple

from testbed.proxy.ipvs import names
from testbed.proxy.model import Endpoint, ServicePort, ServicePortName, categorize_endpoints

# An ipset member: (set name, fields). Fields by type: hash:ip (ip,), hash:ip,port (ip, proto, port),
# hash:ip,port,ip / hash:ip,port,net (ip, proto, port, ip-or-cidr), bitmap:port (port,).
SetEntry = tuple[str, tuple]


class VirtualServer(NamedTuple):
    """The kernel's key of one IPVS virtual service."""

    protocol: str  # "TCP", "UDP", "SCTP"
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.protocol} {self.address}:{self.port}"


@dataclass(frozen=True)
class VirtualService:
    """One virtual service as it should be: its settings and its real servers ("ip:port")."""

    key: VirtualServer
    scheduler: str
    persistence: int  # ClientIP affinity timeout in seconds; 0: none
    dests: tuple[str, ...]
    owner: ServicePortName
    role: str  # "cluster IP", "external IP", "load balancer IP", "node port"

    @property
    def settings(self) -> tuple[str, int]:
        return (self.scheduler, self.persistence)


@dataclass(frozen=True)
class ServicePlan:
    services: tuple[VirtualService, ...]
    entries: frozenset[SetEntry]
    bound: frozenset[str]  # addresses kube-ipvs0 holds for it
    no_node_access: tuple[VirtualServer, ...]  # LB IP:ports with source ranges that exclude the node


def _dests(endpoints: tuple[Endpoint, ...]) -> tuple[str, ...]:
    return tuple(sorted(ep.addr for ep in endpoints))


def _in_any(ips: tuple[str, ...], cidrs: tuple[str, ...]) -> bool:
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            continue
    return any(ipaddress.ip_address(ip) in n for ip in ips for n in networks)


def plan_service(sp: ServicePort, endpoints: tuple[Endpoint, ...], scheduler: str,
                 nodeport_ips: tuple[str, ...], node_ips: tuple[str, ...]) -> ServicePlan:
    """Everything one ServicePort needs in IPVS, the ipsets and on kube-ipvs0."""
    cluster, local, _, _ = categorize_endpoints(sp, endpoints)
    internal = _dests(local if sp.internal_policy_local and local else cluster)
    external = _dests(local if sp.external_policy_local and local else cluster)
    sched = names.FAULT_SCHEDULER if sp.invalid_rule else scheduler
    persistence = sp.session_affinity_timeout or 0
    proto, p = sp.protocol, sp.protocol.lower()
    services: list[VirtualService] = []

    def virtual(address: str, port: int, dests: tuple[str, ...], role: str) -> None:
        services.append(VirtualService(VirtualServer(proto, address, port), sched, persistence, dests, sp.name, role))

    entries: set[SetEntry] = {(names.CLUSTER_IP.name, (sp.cluster_ip, p, sp.port))}
    virtual(sp.cluster_ip, sp.port, internal, "cluster IP")
    for ep in endpoints:
        if ep.is_local:  # hairpin: a pod reaching itself through the Service is masqueraded
            entries.add((names.LOOP_BACK.name, (ep.ip, p, ep.port, ep.ip)))
    external_set = names.EXTERNAL_IP_LOCAL if sp.external_policy_local else names.EXTERNAL_IP
    for ip in sp.external_ips:
        entries.add((external_set.name, (ip, p, sp.port)))
        virtual(ip, sp.port, external, "external IP")
    no_node_access = []
    for ip in sp.load_balancer_ips:
        entries.add((names.LOAD_BALANCER.name, (ip, p, sp.port)))
        if sp.external_policy_local:
            entries.add((names.LOAD_BALANCER_LOCAL.name, (ip, p, sp.port)))
        if sp.load_balancer_source_ranges:
            entries.add((names.LOAD_BALANCER_FW.name, (ip, p, sp.port)))
            for cidr in sp.load_balancer_source_ranges:
                try:  # as the kernel stores it
                    cidr = str(ipaddress.ip_network(cidr, strict=False))
                except ValueError:
                    continue
                entries.add((names.LOAD_BALANCER_SOURCE_CIDR.name, (ip, p, sp.port, cidr)))
            if _in_any(node_ips, sp.load_balancer_source_ranges):  # the node reaches its LB IP from that IP
                entries.add((names.LOAD_BALANCER_SOURCE_IP.name, (ip, p, sp.port, ip)))
            else:
                no_node_access.append(VirtualServer(proto, ip, sp.port))
        virtual(ip, sp.port, external, "load balancer IP")
    if sp.node_port:
        _node_port_entries(sp, nodeport_ips, entries)
        for ip in nodeport_ips:
            virtual(ip, sp.node_port, external, "node port")
    if sp.health_check_node_port:
        entries.add((names.HEALTH_CHECK_NODE_PORT.name, (sp.health_check_node_port,)))
    bound = frozenset((sp.cluster_ip, *sp.external_ips, *sp.load_balancer_ips))
    entries.update((names.IPVS_IPS.name, (ip,)) for ip in bound)
    return ServicePlan(tuple(services), frozenset(entries), bound, tuple(no_node_access))


def _node_port_entries(sp: ServicePort, nodeport_ips: tuple[str, ...], entries: set[SetEntry]) -> None:
    sets = [names.NODE_PORT[sp.protocol]] + ([names.NODE_PORT_LOCAL[sp.protocol]] if sp.external_policy_local else [])
    for spec in sets:
        if spec.kind == "bitmap:port":
            entries.add((spec.name, (sp.node_port,)))
        else:  # SCTP: hash:ip,port per node address
            entries.update((spec.name, (ip, "sctp", sp.node_port)) for ip in nodeport_ips)
