"""IPVS mode's fixed names: the dummy device, schedulers, ipsets, chains and hook jumps.

As upstream's proxier.go and ipset.go (ipsetInfo, ipsetWithIptablesChain, iptablesJumpChain).
"""

from __future__ import annotations

from typing import NamedTuple

from testbed.proxy.iptables.hooks import HookRule, hook

DUMMY_DEVICE = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"
# --ipvs-scheduler: the kernel's schedulers kube-proxy documents (ip_vs_<name> modules).
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq")
# The scheduler a Service annotated svclab.io/fault: invalid-rules gets: the kernel refuses it.
FAULT_SCHEDULER = "svclab-fault-no-such-scheduler"
IP_VS_SVC_F_PERSISTENT = 0x1
DRAIN_TIMEOUT = 900.0  # seconds a removed real server may keep connections before it is deleted


class SetSpec(NamedTuple):
    name: str
    kind: str  # ipset type
    comment: str


LOOP_BACK = SetSpec("KUBE-LOOP-BACK", "hash:ip,port,ip",
                    "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose")
CLUSTER_IP = SetSpec("KUBE-CLUSTER-IP", "hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose")
EXTERNAL_IP = SetSpec("KUBE-EXTERNAL-IP", "hash:ip,port",
                      "Kubernetes service external ip + port for masquerade and filter purpose")
EXTERNAL_IP_LOCAL = SetSpec("KUBE-EXTERNAL-IP-LOCAL", "hash:ip,port",
                            "Kubernetes service external ip + port with externalTrafficPolicy=local")
LOAD_BALANCER = SetSpec("KUBE-LOAD-BALANCER", "hash:ip,port", "Kubernetes service lb portal")
LOAD_BALANCER_FW = SetSpec("KUBE-LOAD-BALANCER-FW", "hash:ip,port",
                           "Kubernetes service load balancer ip + port for load balancer with sourceRange")
LOAD_BALANCER_LOCAL = SetSpec("KUBE-LOAD-BALANCER-LOCAL", "hash:ip,port",
                              "Kubernetes service load balancer ip + port with externalTrafficPolicy=local")
LOAD_BALANCER_SOURCE_IP = SetSpec("KUBE-LOAD-BALANCER-SOURCE-IP", "hash:ip,port,ip",
                                  "Kubernetes service load balancer ip + port + source IP for packet filter purpose")
LOAD_BALANCER_SOURCE_CIDR = SetSpec("KUBE-LOAD-BALANCER-SOURCE-CIDR", "hash:ip,port,net",
                                    "Kubernetes service load balancer ip + port + source cidr for packet filter "
                                    "purpose")
NODE_PORT = {
    "TCP": SetSpec("KUBE-NODE-PORT-TCP", "bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    "UDP": SetSpec("KUBE-NODE-PORT-UDP", "bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    "SCTP": SetSpec("KUBE-NODE-PORT-SCTP-HASH", "hash:ip,port",
                    "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"),
}
NODE_PORT_LOCAL = {
    "TCP": SetSpec("KUBE-NODE-PORT-LOCAL-TCP", "bitmap:port",
                   "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    "UDP": SetSpec("KUBE-NODE-PORT-LOCAL-UDP", "bitmap:port",
                   "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    "SCTP": SetSpec("KUBE-NODE-PORT-LOCAL-SCTP-HASH", "hash:ip,port",
                    "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"),
}
HEALTH_CHECK_NODE_PORT = SetSpec("KUBE-HEALTH-CHECK-NODE-PORT", "bitmap:port", "Kubernetes health check node port")
IPVS_IPS = SetSpec("KUBE-IPVS-IPS", "hash:ip", "Kubernetes ipvs ip")

SETS = (LOOP_BACK, CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL, LOAD_BALANCER, LOAD_BALANCER_FW,
        LOAD_BALANCER_LOCAL, LOAD_BALANCER_SOURCE_IP, LOAD_BALANCER_SOURCE_CIDR, *NODE_PORT.values(),
        *NODE_PORT_LOCAL.values(), HEALTH_CHECK_NODE_PORT, IPVS_IPS)
SET_KINDS = {s.name: s.kind for s in SETS}

# Chains (all fixed: nothing per Service).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_NODE_PORT = "KUBE-NODE-PORT"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"
NAT_CHAINS = (KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_LOAD_BALANCER, KUBE_MARK_MASQ)
FILTER_CHAINS = (KUBE_FORWARD, KUBE_NODE_PORT, KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, KUBE_IPVS_FILTER,
                 KUBE_IPVS_OUT_FILTER)

HOOKS: tuple[HookRule, ...] = (
    hook("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    hook("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    hook("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    hook("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    hook("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
    hook("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    hook("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    hook("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    hook("filter", "OUTPUT", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
)
