"""iptables mode: chain names (upstream's hashes), constants, and the renderer's Config.

Chains (pkg/proxy/iptables/proxier.go):
  filter  KUBE-SERVICES (REJECT Services without endpoints), KUBE-EXTERNAL-SERVICES (REJECT /
          DROP external traffic without usable endpoints), KUBE-FORWARD, KUBE-NODEPORTS
          (health-check node ports), KUBE-PROXY-FIREWALL (loadBalancerSourceRanges drops)
  nat     KUBE-SERVICES -> KUBE-SVC-/KUBE-SVL-/KUBE-EXT-/KUBE-FW-<hash> -> KUBE-SEP-<hash>
          (DNAT), KUBE-NODEPORTS, KUBE-MARK-MASQ, KUBE-POSTROUTING (MASQUERADE marked packets)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from testbed.proxy.model import ServicePortName

# Top-level chains.
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FIREWALL = "KUBE-FIREWALL"  # upstream's (and kubelet's) guard of localhost NodePorts
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"  # an empty chain in mangle, nat and filter; gone = flushed

FILTER_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL)
NAT_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")

MASQ_MARK = "0x4000"  # upstream's default --iptables-masquerade-bit 14
RESTORE_FLAGS = ("--noflush", "--counters")  # iptables-restore flags for every sync, as upstream
LARGE_CLUSTER_ENDPOINTS = 1000  # above this many endpoints, per-endpoint comments are dropped
SECTION_CHAINS = 500  # per-service chains per nat COMMIT in large documents (Config.section_chains)


@dataclass(frozen=True)
class Config:
    """What the renderer needs to know about the node, besides the ProxyState.

    cluster_cidr: the pod CIDR of the whole cluster (upstream's --cluster-cidr local-traffic
      detector). With it, traffic to a ClusterIP from outside the pod network is masqueraded
      (`! -s CIDR` in KUBE-SVC) and pods reaching a Local-policy external address are
      short-circuited to all endpoints. Without it, neither rule is written (as upstream).
    node_ips: the node's addresses: the loadBalancerSourceRanges check of whether the node
      itself may reach the LoadBalancer IP.
    nodeport_addresses: the node addresses that accept NodePorts (--nodeport-addresses, resolved
      to this node's IPs); empty: every local address (`-m addrtype --dst-type LOCAL`, upstream's
      default).
    masquerade_all: masquerade all traffic to ClusterIPs (--masquerade-all).
    localhost_nodeports: NodePorts on 127.0.0.0/8 (upstream's --iptables-localhost-nodeports, on
      by default; the backend sets route_localnet in the node's namespace): KUBE-FIREWALL drops
      packets to 127.0.0.0/8 from elsewhere that no DNAT made. Off: the match-all NodePort jump
      gets `! -d 127.0.0.0/8`, as upstream.
    random_fully: add --random-fully to MASQUERADE (upstream does when iptables supports it).
    large_cluster_endpoints: above this many endpoints in all, per-endpoint comments are left
      out (upstream's largeClusterMode, 1000).
    section_chains: split the per-service chains into nat sections of about this many chains
      when a document writes more than that (see "iptables-nft and large documents" in
      document.py); 0: never.
    """

    cluster_cidr: str | None = None
    node_ips: tuple[str, ...] = ()
    nodeport_addresses: tuple[str, ...] = ()
    masquerade_all: bool = False
    localhost_nodeports: bool = True
    random_fully: bool = False
    large_cluster_endpoints: int = LARGE_CLUSTER_ENDPOINTS
    section_chains: int = SECTION_CHAINS


# ------------------------------------------------------------------ chain names


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # standard base32 alphabet
_B32_PAIRS = [_B32[i >> 5] + _B32[i & 31] for i in range(1024)]  # 10 bits -> 2 characters


def _hash16(text: str) -> str:
    """base32(sha256(text))[:16]: the first 16 characters encode the first 10 bytes (80 bits).
    A table of character pairs does it 5x faster than base64.b32encode (pure Python in 3.11)."""
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    t = _B32_PAIRS
    return (t[n >> 70] + t[(n >> 60) & 1023] + t[(n >> 50) & 1023] + t[(n >> 40) & 1023]
            + t[(n >> 30) & 1023] + t[(n >> 20) & 1023] + t[(n >> 10) & 1023] + t[n & 1023])


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """base32(sha256("ns/svc:port" + "tcp"))[:16], upstream's portProtoHash."""
    return _hash16(service_port_name + protocol)


@lru_cache(maxsize=1 << 18)
def endpoint_chain(service_port_name: str, protocol: str, addr: str) -> str:
    """KUBE-SEP-<hash> of one endpoint ("ip:port") of a ServicePortName ("ns/svc:port", "tcp")."""
    return "KUBE-SEP-" + _hash16(service_port_name + protocol + addr)


class ServiceChains(NamedTuple):
    """Everything about a ServicePortName the rules spell out, computed once."""

    text: str  # "ns/svc:port"
    proto: str  # "tcp"
    svc: str  # KUBE-SVC-…: Cluster policy endpoints
    svl: str  # KUBE-SVL-…: Local policy endpoints
    ext: str  # KUBE-EXT-…: entry for NodePort / external IPs / LoadBalancer IPs
    fw: str  # KUBE-FW-…: loadBalancerSourceRanges


@lru_cache(maxsize=1 << 16)
def service_chains(name: ServicePortName) -> ServiceChains:
    text, proto = str(name), name.protocol.lower()
    h = port_proto_hash(text, proto)
    return ServiceChains(text, proto, "KUBE-SVC-" + h, "KUBE-SVL-" + h, "KUBE-EXT-" + h, "KUBE-FW-" + h)


def is_service_chain(chain: str) -> bool:
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


def service_chains_in(save_output: str) -> set[str]:
    """The per-service chains an `iptables-save -t nat` dump declares (to repair after a failure)."""
    return {
        line[1:].split(" ", 1)[0]
        for line in save_output.splitlines()
        if line.startswith(":KUBE-") and is_service_chain(line[1:])
    }
