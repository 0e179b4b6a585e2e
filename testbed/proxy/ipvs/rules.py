"""IPVS mode's iptables rules: a fixed document, rewritten only when it changes.

As upstream's writeIptablesRules: masquerade (off-cluster sources to ClusterIPs, NodePorts,
LoadBalancer IPs, external IPs, hairpin via KUBE-LOOP-BACK), the Local-policy exceptions
(KUBE-NODE-PORT-LOCAL-*, KUBE-LOAD-BALANCER-LOCAL: RETURN before masquerading), source ranges
(KUBE-SOURCE-RANGES-FIREWALL), the health-check node ports, and KUBE-IPVS-FILTER (no access to
other ports of the node through a Service address). The rules only match ipsets, so what
changes with Services is the sets' members. Unlike upstream, every rule is written even while its
set is empty (upstream leaves those out): the document then depends on the Services only through
the LoadBalancer IP:ports the node may not reach (KUBE-IPVS-OUT-FILTER).
"""

from __future__ import annotations

from typing import Iterable

from testbed.proxy.iptables.names import MASQ_MARK
from testbed.proxy.ipvs import names as n
from testbed.proxy.ipvs.desired import VirtualServer

RESTORE_FLAGS = ("--noflush",)


def _match(spec: n.SetSpec, how: str) -> str:
    return f'-m comment --comment "{spec.comment}" -m set --match-set {spec.name} {how}'


def _nat(cluster_cidr: str | None, masquerade_all: bool) -> list[str]:
    rules = [f"-A {n.KUBE_SERVICES} -s 127.0.0.0/8 -j RETURN",
             f"-A {n.KUBE_POSTROUTING} {_match(n.LOOP_BACK, 'dst,dst,src')} -j MASQUERADE",
             f"-A {n.KUBE_SERVICES} {_match(n.LOAD_BALANCER, 'dst,dst')} -j {n.KUBE_LOAD_BALANCER}",
             f"-A {n.KUBE_LOAD_BALANCER} {_match(n.LOAD_BALANCER_LOCAL, 'dst,dst')} -j RETURN"]
    for proto in ("TCP", "UDP", "SCTP"):
        local, every = n.NODE_PORT_LOCAL[proto], n.NODE_PORT[proto]
        how = "dst" if every.kind == "bitmap:port" else "dst,dst"
        rules.append(f"-A {n.KUBE_NODE_PORT} -p {proto.lower()} {_match(local, how)} -j RETURN")
        rules.append(f"-A {n.KUBE_NODE_PORT} -p {proto.lower()} {_match(every, how)} -j {n.KUBE_MARK_MASQ}")
    cluster = f"-A {n.KUBE_SERVICES} {_match(n.CLUSTER_IP, '')}".rstrip()
    if masquerade_all:
        rules.append(f"{cluster} dst,dst -j {n.KUBE_MARK_MASQ}")
    elif cluster_cidr:  # off-cluster sources reaching a ClusterIP are masqueraded
        rules.append(f"{cluster} dst,dst ! -s {cluster_cidr} -j {n.KUBE_MARK_MASQ}")
    else:  # the node reaching a ClusterIP picks a Service address as its source: masquerade that
        rules.append(f"{cluster} src,dst -j {n.KUBE_MARK_MASQ}")
    external = f"-A {n.KUBE_SERVICES} {_match(n.EXTERNAL_IP, 'dst,dst')}"
    rules.append(f"{external} -j {n.KUBE_MARK_MASQ}")
    for head in (external, f"-A {n.KUBE_SERVICES} {_match(n.EXTERNAL_IP_LOCAL, 'dst,dst')}"):
        rules.append(f"{head} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT")
        rules.append(f"{head} -m addrtype --dst-type LOCAL -j ACCEPT")
    rules += [f"-A {n.KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {n.KUBE_NODE_PORT}",
              f"-A {n.KUBE_LOAD_BALANCER} -j {n.KUBE_MARK_MASQ}",
              f"-A {n.KUBE_SERVICES} -m set --match-set {n.CLUSTER_IP.name} dst,dst -j ACCEPT",
              f"-A {n.KUBE_SERVICES} -m set --match-set {n.LOAD_BALANCER.name} dst,dst -j ACCEPT",
              f"-A {n.KUBE_POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
              f"-A {n.KUBE_POSTROUTING} -j MARK --xor-mark {MASQ_MARK}",
              f'-A {n.KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE',
              f"-A {n.KUBE_MARK_MASQ} -j MARK --or-mark {MASQ_MARK}"]
    return rules


def _filter(no_node_access: Iterable[VirtualServer]) -> list[str]:
    rules = [f"-A {n.KUBE_PROXY_FIREWALL} {_match(n.LOAD_BALANCER_FW, 'dst,dst')} -j {n.KUBE_SOURCE_RANGES_FIREWALL}",
             f"-A {n.KUBE_SOURCE_RANGES_FIREWALL} {_match(n.LOAD_BALANCER_SOURCE_CIDR, 'dst,dst,src')} -j RETURN",
             f"-A {n.KUBE_SOURCE_RANGES_FIREWALL} {_match(n.LOAD_BALANCER_SOURCE_IP, 'dst,dst,src')} -j RETURN",
             f"-A {n.KUBE_SOURCE_RANGES_FIREWALL} -j DROP"]
    for vs in sorted(no_node_access):  # for IPVS, the node reaching its LB IP has it as source too
        rules.append(f"-A {n.KUBE_IPVS_OUT_FILTER} -s {vs.address} -m ipvs --vaddr {vs.address} "
                     f"--vproto {vs.protocol.lower()} --vport {vs.port} -j DROP")
    rules += [f'-A {n.KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" '
              f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
              f'-A {n.KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
              "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
              f"-A {n.KUBE_NODE_PORT} {_match(n.HEALTH_CHECK_NODE_PORT, 'dst')} -j ACCEPT"]
    for spec, how in ((n.LOAD_BALANCER, "dst,dst"), (n.CLUSTER_IP, "dst,dst"), (n.EXTERNAL_IP, "dst,dst"),
                      (n.EXTERNAL_IP_LOCAL, "dst,dst"), (n.HEALTH_CHECK_NODE_PORT, "dst")):
        rules.append(f"-A {n.KUBE_IPVS_FILTER} -m set --match-set {spec.name} {how} -j RETURN")
    rules.append(f"-A {n.KUBE_IPVS_FILTER} -m conntrack --ctstate NEW -m set --match-set {n.IPVS_IPS.name} dst "
                 "-j REJECT")
    return rules


def render(cluster_cidr: str | None, no_node_access: Iterable[VirtualServer], masquerade_all: bool = False) -> str:
    """The whole iptables-restore document (`iptables-restore --noflush`): each chain line
    flushes that chain, so applying it replaces our chains' rules and nothing else."""
    lines = ["*filter", *(f":{c} - [0:0]" for c in n.FILTER_CHAINS), *_filter(no_node_access), "COMMIT",
             "*nat", *(f":{c} - [0:0]" for c in n.NAT_CHAINS), *_nat(cluster_cidr, masquerade_all), "COMMIT"]
    return "\n".join(lines) + "\n"


def cleanup_document(saved: dict[str, str]) -> str:
    """Flush and delete whichever of our chains `iptables-save -t <table>` shows (hooks first)."""
    out = []
    for table, chains in (("filter", n.FILTER_CHAINS), ("nat", n.NAT_CHAINS)):
        present = [c for c in chains if f"\n:{c} " in "\n" + saved.get(table, "")]
        if present:
            out += [f"*{table}", *(f":{c} - [0:0]" for c in present), *(f"-X {c}" for c in present), "COMMIT"]
    return "\n".join(out) + "\n" if out else ""
