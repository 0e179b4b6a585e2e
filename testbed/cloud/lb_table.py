"""The load balancer table: what the cloud-controller publishes and the OpenFlow app enforces.

One JSON object per line over a Unix socket (full snapshot on connect and on every
change), so either side can restart and the app re-learns everything at once.
Standard library only: both the asyncio cloud-controller and os-ken import it.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, field

PROTOCOLS = {"TCP": 6, "UDP": 17}


@dataclass(frozen=True)
class Port:
    protocol: str  # TCP or UDP
    port: int  # on the external IP
    node_port: int

    @property
    def ip_proto(self) -> int:
        return PROTOCOLS[self.protocol]


@dataclass(frozen=True)
class LoadBalancer:
    """One external IP: a LoadBalancer Service as the cloud sees it."""

    ip: str
    service: str  # namespace/name, for logs and `ovs-ofctl dump-flows` readers
    ports: tuple[Port, ...]
    backends: tuple[str, ...]  # healthy node IPs, sorted
    source_ranges: tuple[str, ...] = ()  # empty: everyone

    def allows(self, source: str) -> bool:
        if not self.source_ranges:
            return True
        address = ipaddress.IPv4Address(source)
        return any(address in ipaddress.IPv4Network(r, strict=False) for r in self.source_ranges)

    def port_for(self, ip_proto: int, port: int) -> Port | None:
        return next((p for p in self.ports if p.ip_proto == ip_proto and p.port == port), None)


@dataclass(frozen=True)
class Table:
    lbs: tuple[LoadBalancer, ...] = field(default_factory=tuple)

    def by_ip(self) -> dict[str, LoadBalancer]:
        return {lb.ip: lb for lb in self.lbs}

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def loads(cls, line: str | bytes) -> "Table":
        data = json.loads(line)
        return cls(tuple(
            LoadBalancer(
                ip=lb["ip"], service=lb["service"],
                ports=tuple(Port(p["protocol"], p["port"], p["node_port"]) for p in lb["ports"]),
                backends=tuple(lb["backends"]), source_ranges=tuple(lb["source_ranges"]),
            )
            for lb in data["lbs"]
        ))
