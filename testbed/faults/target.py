"""The cluster a fault acts on, and its hosts as fault injection sees them.

A FaultTarget is built from the cluster's name and state root, as every CLI command finds its
cluster; the hosts (node1..nodeN, client, gw) come from the network's own record
(testbed/cluster/topo.py names them), so nothing here needs the API server.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from testbed import naming
from testbed.cluster.netclean import load_record, record_path
from testbed.cluster.topo import Names, TopologyConfig
from testbed.node import podnet
from testbed.paths import DEFAULT_STATE_ROOT, StateDir

#: The host end of each host's links (topo.py): gw has one leg on each bridge.
HOST_LINKS = {"gw": ("eth0", "eth1")}
DEFAULT_LINKS = ("eth0",)
POD_BRIDGE = "cni0"  # the kubelet's bridge: its address is the node's pod gateway (.1 of its pod CIDR)


class FaultError(ValueError):
    """A fault refused before anything changed: the message names the field and why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Host:
    """One host of the testbed: its namespace, its links and the addresses that are its own."""

    name: str  # node1, client, gw
    netns: str
    links: tuple[str, ...]
    addresses: tuple[str, ...]  # host addresses and, for a node, its pod CIDR

    @property
    def is_node(self) -> bool:
        return self.name.startswith("node")


@dataclass(frozen=True)
class FaultTarget:
    """A running cluster, for fault injection: its name and its state directory."""

    cluster: str
    state: StateDir

    @classmethod
    def for_cluster(cls, cluster: str, state_root: Path = DEFAULT_STATE_ROOT) -> "FaultTarget":
        return cls(naming.check_cluster_name(cluster), StateDir.for_cluster(cluster, Path(state_root)))

    @property
    def faults_file(self) -> Path:
        return self.state.path / "faults.json"

    def topology(self) -> TopologyConfig:
        record = load_record(record_path(self.state.path, self.cluster))
        if not record or record.get("cluster") != self.cluster or record.get("state") != "running":
            raise FaultError("cluster", f'cluster "{self.cluster}" is not running (no network in {self.state.path})')
        return TopologyConfig(self.cluster, record["nodes"], record["node_subnet"], record["external_subnet"])

    @property
    def names(self) -> Names:
        return Names(self.cluster, self.topology().nodes)

    def host_names(self) -> list[str]:
        return self.names.hosts

    def node_names(self) -> list[str]:
        return self.topology().node_names

    def check_node(self, node: object, field: str = "node") -> str:
        nodes = self.node_names()
        if node not in nodes:
            raise FaultError(field, f"unknown node {node!r} (nodes: {', '.join(nodes)})")
        return str(node)

    def host(self, name: object, field: str = "target") -> Host:
        """The host named as scenarios name it (node1.., client, gw); FaultError naming `field` if none."""
        config = self.topology()
        hosts = Names(self.cluster, config.nodes).hosts
        if name not in hosts:
            raise FaultError(field, f"unknown host {name!r} (hosts: {', '.join(hosts)})")
        host = str(name)
        netns = naming.node_netns(self.cluster, host)
        if host == "client":
            addresses: tuple[str, ...] = (config.client_ip,)
        elif host == "gw":
            addresses = (config.router_node_ip, config.router_external_ip)
        else:
            ip = config.node_ip(int(host[4:]))
            cidr = pod_cidr(netns)
            addresses = (ip,) + ((cidr,) if cidr else ())
        return Host(host, netns, HOST_LINKS.get(host, DEFAULT_LINKS), addresses)


def pod_cidr(netns: str) -> str | None:
    """A node's pod CIDR, read from its cni0 bridge (the kubelet makes it once the node has one)."""
    with podnet.entered_netns(netns), IPRoute() as ipr:
        index = ipr.link_lookup(ifname=POD_BRIDGE)
        if not index:
            return None
        for msg in ipr.get_addr(index=index[0], family=2):
            address, prefix = msg.get_attr("IFA_ADDRESS"), msg["prefixlen"]
            return str(ipaddress.ip_interface(f"{address}/{prefix}").network)
    return None


def in_netns(netns: str, argv: list[str], input: str | None = None) -> str:
    """Run a kernel tool inside a host's namespace; RuntimeError with the command and its output on failure."""
    command = ["nsenter", f"--net={naming.netns_path(netns)}", "--", *argv]
    result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {netns} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}")
    return result.stdout
