"""The Service allocations the API server owns: ClusterIPs, nodePorts, healthCheckNodePorts.

A Reservation collects what one write takes and gives, so that a refused
write hands everything back and leaves the allocators as they were.
"""

from __future__ import annotations

from testbed.api.v1 import api_pb2 as pb
from testbed.apiserver.allocators import AllocationError, ClusterIPAllocator, PortAllocator
from testbed.api.errors import FieldError, invalid


def needs_node_ports(spec: pb.ServiceSpec) -> bool:
    return spec.type in ("NodePort", "LoadBalancer")


def needs_health_check_port(spec: pb.ServiceSpec) -> bool:
    return spec.type == "LoadBalancer" and spec.external_traffic_policy == "Local"


def node_ports_of(spec: pb.ServiceSpec) -> set[int]:
    ports = {p.node_port for p in spec.ports if p.node_port}
    if spec.health_check_node_port:
        ports.add(spec.health_check_node_port)
    return ports


class Reservation:
    """Allocations made for one write: commit() keeps them, rollback() returns them."""

    def __init__(self, ips: ClusterIPAllocator, ports: PortAllocator) -> None:
        self._ips, self._ports = ips, ports
        self._taken_ips: list[str] = []
        self._taken_ports: list[int] = []
        self._freed_ips: list[str] = []
        self._freed_ports: list[int] = []
        self.errors: list[FieldError] = []

    def take_ip(self, requested: str, path: str) -> str:
        try:
            ip = self._ips.allocate(requested)
        except AllocationError as exc:
            self.errors.append(invalid(path, [requested], str(exc)))
            return requested
        self._taken_ips.append(ip)
        return ip

    def take_port(self, requested: int, path: str) -> int:
        try:
            port = self._ports.allocate(requested)
        except AllocationError as exc:
            self.errors.append(invalid(path, requested, str(exc)))
            return requested
        self._taken_ports.append(port)
        return port

    def free_ip(self, ip: str) -> None:
        self._freed_ips.append(ip)

    def free_port(self, port: int) -> None:
        self._freed_ports.append(port)

    def commit(self) -> None:
        for ip in self._freed_ips:
            self._ips.release(ip)
        for port in self._freed_ports:
            self._ports.release(port)

    def rollback(self) -> None:
        for ip in self._taken_ips:
            self._ips.release(ip)
        for port in self._taken_ports:
            self._ports.release(port)


def allocate_for_create(spec: pb.ServiceSpec, r: Reservation) -> None:
    if spec.cluster_ip != "None":
        spec.cluster_ip = r.take_ip(spec.cluster_ip, "spec.clusterIPs")
        del spec.cluster_ips[:]
        spec.cluster_ips.append(spec.cluster_ip)
    else:
        del spec.cluster_ips[:]
        spec.cluster_ips.append("None")
    _allocate_node_ports(spec, set(), r)


def allocate_for_update(old: pb.ServiceSpec, new: pb.ServiceSpec, r: Reservation) -> None:
    """Keep what the new spec omits (as upstream's patchAllocatedValues), take what it adds."""
    if not new.cluster_ip:
        new.cluster_ip = old.cluster_ip
    if new.cluster_ip != old.cluster_ip:
        r.errors.append(invalid("spec.clusterIPs[0]", new.cluster_ip, "may not change once set"))
        return
    del new.cluster_ips[:]
    new.cluster_ips.append(new.cluster_ip)
    if needs_node_ports(new):
        previous = {(p.port, p.protocol): p.node_port for p in old.ports if p.node_port}
        for port in new.ports:
            if not port.node_port:
                port.node_port = previous.get((port.port, port.protocol), 0)
        if needs_health_check_port(new) and not new.health_check_node_port:
            new.health_check_node_port = old.health_check_node_port
    old_ports = node_ports_of(old)
    _allocate_node_ports(new, old_ports, r)
    for port in old_ports - node_ports_of(new):
        r.free_port(port)


def release_all(spec: pb.ServiceSpec, r: Reservation) -> None:
    if spec.cluster_ip and spec.cluster_ip != "None":
        r.free_ip(spec.cluster_ip)
    for port in node_ports_of(spec):
        r.free_port(port)


def _allocate_node_ports(spec: pb.ServiceSpec, held: set[int], r: Reservation) -> None:
    if not needs_node_ports(spec):
        for port in spec.ports:
            port.node_port = 0
        spec.health_check_node_port = 0
        return
    seen: set[int] = set()
    for i, port in enumerate(spec.ports):
        if port.node_port in held and port.node_port not in seen:
            seen.add(port.node_port)
            continue
        port.node_port = r.take_port(port.node_port, f"spec.ports[{i}].nodePort")
        seen.add(port.node_port)
    if needs_health_check_port(spec):
        if spec.health_check_node_port not in held or not spec.health_check_node_port:
            spec.health_check_node_port = r.take_port(spec.health_check_node_port, "spec.healthCheckNodePort")
    else:
        spec.health_check_node_port = 0
