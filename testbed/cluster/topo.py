"""One cluster's network as pure data: what to build (TopologyConfig) and every name it uses (Names).

Nothing here touches the machine: net.py builds the network from these, netclean.py
finds and removes it by these names.

Layout (``c`` is the cluster name, 1-8 characters ``[a-z][a-z0-9]*``)::

    node1 .. nodeN ---- bridge c-nodes ---- gw ---- bridge c-edge ---- client
    node subnet (default 172.18.0.0/16)   (router)  external subnet (default 203.0.113.0/24)
    gw = .1, node i = .(i+1)                        gw = .1, client = .2

* Nodes, the router ``gw`` and the ``client`` are Mininet hosts: a ``bash`` in a network
  namespace of its own. ``gw`` forwards (``ip_forward=1`` inside its own namespace only);
  the client has a route to the node subnet via gw, the nodes one to the external subnet
  via gw. No default route, no NAT, no link to the root namespace's networking anywhere.
* Both bridges are OVS bridges (net.py says which datapath and why); the cloud load
  balancer's OpenFlow app controls ``c-edge``.

Naming scheme. Everything derives from the cluster name, so two clusters never collide and
``clean()`` finds leftovers without the state record. Cluster names cannot contain ``-``,
so the ``c-`` prefix is unambiguous (cluster ``a`` owns ``a-*``, never ``ab-*``), and the
discovery patterns are anchored, exact shapes (``Names.*_re``). Names in the root
namespace are at most 8 + 6 = 14 characters (IFNAMSIZ allows 15).

* Mininet host names = named netns: ``c-node<i>``, ``c-client``, ``c-gw``, bind mounts
  ``/run/netns/c-<host>`` of the host shells' namespaces (``ip netns exec c-node1 ...``).
  The API uses the short names ``node<i>``, ``client``, ``gw``.
* OVS bridges (root ns; OVS also makes a device of the same name): ``c-nodes``, ``c-edge``.
* Bridge ports = switch-side veth ends (root ns): ``c-n<i>`` (node i), ``c-ngw`` (gw on
  c-nodes), ``c-ecl`` (client on c-edge), ``c-egw`` (gw on c-edge).
* Host-side veth ends: ``eth0`` (nodes, client, gw's leg on c-nodes) and ``eth1`` (gw's
  leg on c-edge). They are created directly inside the host namespace: never in the root
  namespace, not even for an instant.
* Mininet shells: ``bash --norc --noediting -is mininet:<Mininet name>`` (hosts and the two
  bridges; the bridges' shells run in the root namespace).
* OpenFlow ports: on c-nodes node i is port i and gw port 1000; on c-edge gw is port 1 and
  the client port 2. Datapath ids: first 16 hex digits of sha256(bridge name). The load
  balancer's conntrack zone on c-edge: from sha256(``c-edge``) (Names.ct_zone).
* State record: ``<state_dir>/network-c.json``. Lock: ``/run/lock/svclab-net-c.lock``
  (flock held while the network exists; the kernel drops it when the holder dies).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from testbed import naming
from testbed.naming import check_cluster_name

MAX_NODES = 999
NODES_OFPORT_GW = 1000
EDGE_OFPORT_GW = 1
EDGE_OFPORT_CLIENT = 2


def _network(value: object, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(value, strict=True) if not isinstance(value, ipaddress.IPv4Network) else value
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid {what} {value!r}: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ValueError(f"invalid {what} {value!r}: must be an IPv4 network")
    if net.prefixlen > 30:
        raise ValueError(f"invalid {what} {value!r}: a /{net.prefixlen} is too small (at most /30)")
    return net


@dataclass(frozen=True)
class TopologyConfig:
    """What to build. Subnets may be given as strings; they are stored as IPv4Network."""

    name: str
    nodes: int = 3
    node_subnet: ipaddress.IPv4Network | str = "172.18.0.0/16"
    external_subnet: ipaddress.IPv4Network | str = "203.0.113.0/24"
    #: "user", "kernel" or None (detect: kernel when the openvswitch module is there)
    datapath: str | None = None

    def __post_init__(self) -> None:
        check_cluster_name(self.name)
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"invalid node count {self.nodes!r}: must be 1..{MAX_NODES}")
        node_net = _network(self.node_subnet, "node subnet")
        ext_net = _network(self.external_subnet, "external subnet")
        if node_net.overlaps(ext_net):
            raise ValueError(f"node subnet {node_net} and external subnet {ext_net} overlap")
        # usable hosts: all but network and broadcast; gw takes .1, nodes .2 ..
        if node_net.num_addresses - 2 < self.nodes + 1:
            raise ValueError(f"node subnet {node_net} is too small for a router and {self.nodes} nodes")
        if self.datapath not in (None, "user", "kernel"):
            raise ValueError(f"invalid datapath {self.datapath!r}: 'user', 'kernel' or None")
        object.__setattr__(self, "node_subnet", node_net)
        object.__setattr__(self, "external_subnet", ext_net)

    # addresses -----------------------------------------------------------------------------
    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def node_ip(self, index: int) -> str:
        """Address of node ``index`` (1-based): .2, .3, ..."""
        if not 1 <= index <= self.nodes:
            raise IndexError(index)
        return str(self.node_subnet.network_address + 1 + index)

    @property
    def router_node_ip(self) -> str:
        return str(self.node_subnet.network_address + 1)

    @property
    def router_external_ip(self) -> str:
        return str(self.external_subnet.network_address + 1)

    @property
    def client_ip(self) -> str:
        return str(self.external_subnet.network_address + 2)


# --------------------------------------------------------------------------------------------
# Naming scheme


@dataclass(frozen=True)
class Names:
    """Every name one cluster uses; pure functions of the cluster name and node count."""

    cluster: str
    nodes: int

    @property
    def prefix(self) -> str:
        return self.cluster + "-"

    @property
    def hosts(self) -> list[str]:
        """Short host names, as used by the API: node1..nodeN, client, gw."""
        return [f"node{i}" for i in range(1, self.nodes + 1)] + ["client", "gw"]

    def mininet_name(self, host: str) -> str:
        return self.prefix + host

    def netns(self, host: str) -> str:
        return naming.node_netns(self.cluster, host)

    def mount(self, host: str) -> Path:
        return naming.NETNS_DIR / self.netns(host)

    @property
    def nodes_bridge(self) -> str:
        return self.prefix + "nodes"

    @property
    def edge_bridge(self) -> str:
        return self.prefix + "edge"

    @property
    def bridges(self) -> list[str]:
        return [self.nodes_bridge, self.edge_bridge]

    def node_port(self, index: int) -> str:
        return f"{self.prefix}n{index}"

    @property
    def gw_nodes_port(self) -> str:
        return self.prefix + "ngw"

    @property
    def client_port(self) -> str:
        return self.prefix + "ecl"

    @property
    def gw_edge_port(self) -> str:
        return self.prefix + "egw"

    @property
    def ports(self) -> list[str]:
        """Switch-side veth ends (root namespace)."""
        return [self.node_port(i) for i in range(1, self.nodes + 1)] + [
            self.gw_nodes_port,
            self.client_port,
            self.gw_edge_port,
        ]

    def dpid(self, bridge: str) -> str:
        digest = hashlib.sha256(bridge.encode()).hexdigest()[:16]
        return digest if int(digest, 16) else "0000000000000001"

    @property
    def ct_zone(self) -> int:
        """The edge bridge's conntrack zone, 1-65535, from the cluster name.

        ovs-vswitchd has one connection tracker for all its bridges, and every cluster uses
        the same addresses, so each cluster's load balancer keeps its connections in a zone
        of its own (two names share one with odds 1 in 65,535).
        """
        return int(hashlib.sha256(self.edge_bridge.encode()).hexdigest()[:8], 16) % 65535 + 1

    # patterns for discovery without a record -------------------------------------------------
    @staticmethod
    def bridge_re(cluster: str) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(cluster)}-(nodes|edge)\Z")

    @staticmethod
    def root_ifname_re(cluster: str) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(cluster)}-(nodes|edge|n[0-9]+|ngw|ecl|egw)\Z")

    @staticmethod
    def netns_re(cluster: str) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(cluster)}-(node[0-9]+|client|gw)\Z")

    @staticmethod
    def shell_name_re(cluster: str) -> re.Pattern[str]:
        """Mininet node names of the cluster (hosts and switches)."""
        return re.compile(rf"^{re.escape(cluster)}-(node[0-9]+|client|gw|nodes|edge)\Z")
