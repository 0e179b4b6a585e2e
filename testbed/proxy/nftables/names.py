"""The names of everything kube-proxy's nftables table holds, and the renderer's Config.

Objects (pkg/proxy/nftables/proxier.go):
  base chains   filter-prerouting-pre-dnat / filter-output-pre-dnat (priority dstnat-10 = -110:
                LoadBalancer source ranges, before DNAT), filter-input / filter-forward /
                filter-output (priority filter = 0: Services without (local) endpoints, invalid
                ClusterIP ports, after DNAT), nat-prerouting / nat-output (dstnat) -> `services`,
                nat-postrouting (srcnat) -> `masquerading`
  maps          service-ips, no-endpoint-services, firewall-ips (ipv4_addr . inet_proto .
                inet_service : verdict), service-nodeports, no-endpoint-nodeports (inet_proto .
                inet_service : verdict); sets cluster-ips, nodeport-ips (only when NodePorts are
                limited to some addresses)
  per Service   service-/local-/external-/firewall-<HASH8>-ns/svc/proto/port chains,
  port          affinity-<HASH8>-ns/svc/proto/port__ip/port sets (ClientIP)
  svclab's      hairpin-endpoints set (ipv4_addr . ipv4_addr), see "Endpoints" in services.py
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from testbed.proxy.model import ServicePortName

FAMILY = "ip"
TABLE = "kube-proxy"
_T = f"{FAMILY} {TABLE}"  # how the script names the table

# Top-level chains.
SERVICES = "services"
MASQUERADING = "masquerading"
MARK_MASQ = "mark-for-masquerade"
REJECT_CHAIN = "reject-chain"
FIREWALL_CHECK = "firewall-check"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"

# Sets and maps.
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"
HAIRPIN_ENDPOINTS = "hairpin-endpoints"  # svclab's: see "Endpoints" in services.py

_IP_PROTO_PORT = "ipv4_addr . inet_proto . inet_service : verdict"
_PROTO_PORT = "inet_proto . inet_service : verdict"
# name -> (kind, declaration), in upstream's order; nodeport-ips is declared only when used
CONTAINERS: dict[str, tuple[str, str]] = {
    CLUSTER_IPS: ("set", 'type ipv4_addr ; comment "Active ClusterIPs"'),
    NODEPORT_IPS: ("set", 'type ipv4_addr ; comment "IPs that accept NodePort traffic"'),
    FIREWALL_IPS: ("map", f'type {_IP_PROTO_PORT} ; comment "destinations that are subject to LoadBalancerSourceRanges"'),
    NO_ENDPOINT_NODEPORTS: ("map", f'type {_PROTO_PORT} ; comment "vmap to drop or reject packets to service nodeports '
                                   'with no endpoints"'),
    NO_ENDPOINT_SERVICES: ("map", f'type {_IP_PROTO_PORT} ; comment "vmap to drop or reject packets to services with '
                                  'no endpoints"'),
    SERVICE_IPS: ("map", f'type {_IP_PROTO_PORT} ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"'),
    SERVICE_NODEPORTS: ("map", f'type {_PROTO_PORT} ; comment "NodePort traffic"'),
    HAIRPIN_ENDPOINTS: ("set", 'type ipv4_addr . ipv4_addr ; comment "local endpoints as (source . destination): '
                               'a pod reaching itself through a Service"'),
}

# (name, type, hook, priority) as upstream: filtering that must see the Service address
# (source ranges) runs before DNAT, the endpoint checks after it.
BASE_CHAINS = (
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-forward", "filter", "forward", 0),
    ("filter-input", "filter", "input", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
# (from base chain, to chain, match) as upstream's nftablesJumpChains
JUMPS = (
    ("filter-prerouting-pre-dnat", FIREWALL_CHECK, "ct state new"),
    ("filter-output-pre-dnat", FIREWALL_CHECK, "ct state new"),
    ("filter-forward", SERVICE_ENDPOINTS_CHECK, "ct state new"),
    ("filter-forward", CLUSTER_IPS_CHECK, "ct state new"),
    ("filter-input", NODEPORT_ENDPOINTS_CHECK, "ct state new"),
    ("filter-input", SERVICE_ENDPOINTS_CHECK, "ct state new"),
    ("filter-output", SERVICE_ENDPOINTS_CHECK, "ct state new"),
    ("filter-output", CLUSTER_IPS_CHECK, "ct state new"),
    ("nat-prerouting", SERVICES, ""),
    ("nat-output", SERVICES, ""),
    ("nat-postrouting", MASQUERADING, ""),
)
TOP_CHAINS = (SERVICES, MASQUERADING, MARK_MASQ, REJECT_CHAIN, FIREWALL_CHECK, SERVICE_ENDPOINTS_CHECK,
              NODEPORT_ENDPOINTS_CHECK, CLUSTER_IPS_CHECK)

MASQ_MARK = "0x4000"  # upstream's default --masquerade-bit 14
CASCADE_MAX = 32  # up to this many endpoints: numgen rules; above: upstream's anonymous vmap
GC_THRESHOLD = 1000  # stale chains a partial sync may leave for later before it deletes them
NAME_LENGTH_MAX = 256  # knftables.NameLengthMax
_BASE_LENGTH_MAX = NAME_LENGTH_MAX - 16  # upstream's chainNameBaseLengthMax


@dataclass(frozen=True)
class Config:
    """What the renderer needs to know about the node, besides the ProxyState.

    cluster_cidr: the cluster's pod CIDR (upstream's local-traffic detector): traffic to a
      ClusterIP from outside it is masqueraded, pods reaching a Local-policy external address
      are short-circuited. Without it neither rule is written (as upstream).
    node_ips: the node's addresses; a LoadBalancer IP's source ranges that hold one of them
      also admit the LoadBalancer IPs themselves (the node reaching its own LB IP).
    nodeport_addresses: limit NodePorts to these node addresses (the nodeport-ips set);
      empty: every local address but 127.0.0.0/8 (`fib daddr type local`), upstream's default.
    service_cidrs: drop traffic to unallocated addresses of these ranges (cluster-ips-check).
    masquerade_all: masquerade all traffic to ClusterIPs.
    cascade_max: most endpoints balanced by numgen rules; more use a vmap (see "Balancing" in services.py).
    gc_threshold: stale chains a partial sync may leave flushed but undeleted.
    """

    cluster_cidr: str | None = None
    node_ips: tuple[str, ...] = ()
    nodeport_addresses: tuple[str, ...] = ()
    service_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    cascade_max: int = CASCADE_MAX
    gc_threshold: int = GC_THRESHOLD


# ------------------------------------------------------------------ names


def hash_and_truncate(name: str) -> str:
    """"HASH8-name": the first 8 characters of base32(sha256(name)), then the name, cut to fit
    (upstream's hashAndTruncate). 8 base32 characters are the first 5 bytes of the digest."""
    digest = hashlib.sha256(name.encode()).digest()
    name = base64.b32encode(digest[:5]).decode() + "-" + name
    if len(name) > _BASE_LENGTH_MAX:
        name = name[:_BASE_LENGTH_MAX - 3] + "..."
    return name


class ServiceNames(NamedTuple):
    text: str  # "ns/svc:port", for comments
    proto: str  # "tcp"
    base: str  # "HASH8-ns/svc/tcp/port" (upstream's servicePortChainNameBase)
    cluster: str  # service-…: Cluster policy endpoints
    local: str  # local-…: Local policy endpoints
    external: str  # external-…: NodePort, external IPs, LoadBalancer IPs
    firewall: str  # firewall-…: loadBalancerSourceRanges


@lru_cache(maxsize=1 << 16)
def service_names(name: ServicePortName) -> ServiceNames:
    proto = name.protocol.lower()
    base = hash_and_truncate(f"{name.namespace}/{name.name}/{proto}/{name.port_name}")
    return ServiceNames(str(name), proto, base, "service-" + base, "local-" + base, "external-" + base,
                        "firewall-" + base)


@lru_cache(maxsize=1 << 18)
def affinity_set_name(name: ServicePortName, ip: str, port: int) -> str:
    """The ClientIP affinity set of one endpoint (upstream's servicePortEndpointAffinityNamePrefix
    + servicePortEndpointChainNameBase)."""
    base = hash_and_truncate(f"{name.namespace}/{name.name}/{name.protocol.lower()}/{name.port_name}__{ip}/{port}")
    return "affinity-" + base


def is_service_chain(chain: str) -> bool:
    """Per-service chains have a "/" in their name; the top-level ones don't (as upstream)."""
    return "/" in chain


# ------------------------------------------------------------------ addresses


@lru_cache(maxsize=4096)
def _cidr(text: str) -> str | None:
    try:
        return str(ipaddress.IPv4Network(text.strip(), strict=False))
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def _ipv4(text: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        return None

