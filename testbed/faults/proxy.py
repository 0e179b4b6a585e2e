"""A node's kube-proxy state lost behind its back: its rules flushed, its conntrack table emptied.

flush_rules does what an operator's `iptables -t nat -F` or `nft flush table ip kube-proxy`
does in the node's namespace, by the mode the node's kube-proxy runs in, and returns at once:
kube-proxy's own monitor notices within a second and resyncs in full (docs/kube-proxy.md).
"""

from __future__ import annotations

from testbed.cluster.proxy_readback import NodeProxy
from testbed.faults.state import Fault
from testbed.faults.target import FaultTarget, in_netns
from testbed.proxy.nftables.names import TABLE as NFT_TABLE

FLUSH = {"iptables": ["iptables", "-w", "-t", "nat", "-F"], "nftables": ["nft", "flush", "table", "ip", NFT_TABLE]}


def flush_rules(cluster: FaultTarget, node: str) -> Fault:
    """Flush the node's kube-proxy rules (its nat table, or its nftables table); no waiting for the repair."""
    host = cluster.host(cluster.check_node(node), field="node")
    mode = NodeProxy(cluster.cluster, cluster.state.path, host.name).mode()
    argv = FLUSH.get(mode, FLUSH["iptables"])
    in_netns(host.netns, argv)
    return Fault("flush-rules", {"node": host.name, "mode": mode}, summary=f"{host.name}: {' '.join(argv)}")


def flush_conntrack(cluster: FaultTarget, node: str) -> Fault:
    """Empty the host's connection tracking table (`conntrack -F` in its namespace): NATed
    connections lose their translation, and their next packets are taken as new."""
    host = cluster.host(node, field="node")
    empty_conntrack(host.netns)
    return Fault("flush-conntrack", {"node": host.name}, summary=f"{host.name}: conntrack -F")


def empty_conntrack(netns: str) -> None:
    """`conntrack -F` in the namespace (RuntimeError naming the output if it fails)."""
    in_netns(netns, ["conntrack", "-F"])
