"""kube-proxy flags and API behaviour that upstream has in every mode, against the real kernel,
with real packets, in both backends: --masquerade-all, the drop of unallocated service-CIDR
addresses (nftables), --nodeport-addresses across IP families and on localhost,
loadBalancerSourceRanges with surrounding whitespace, and --cluster-cidr ''.

IP plan (per test, its own namespaces): node (the rules) with veth1 10.244.1.1 toward the
endpoint pod 10.244.1.2, veth2 10.244.2.1 toward a client pod 10.244.2.2, and eth0 holding
203.0.113.1/24 and the node address 172.18.0.2/16 toward the external client 203.0.113.2.
Pods and the external client route everything via the node. The endpoint's server answers
"pod <source address it saw>".
"""

from __future__ import annotations

import os
import shutil

import pytest

from testbed.proxy import backends
from testbed.proxy.iptables.backend import IptablesBackend
from testbed.proxy.model import ProxyState
from testbed.proxy.nftables.backend import NftablesBackend
from tests.netns import Namespaces, ask, inside, link, netns_fixture, run, serve
from tests.proxy_fixtures import CLUSTER_CIDR, NODE, NODE_IP, eps, svc

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "iptables-restore")),
    reason="needs root, ip, nft and iptables-restore (network namespaces)")]
netns = netns_fixture("pxf")
BACKENDS = pytest.mark.parametrize("backend_class", [IptablesBackend, NftablesBackend], ids=["iptables", "nftables"])

POD_IP, CLIENT_POD_IP, EXT_IP = "10.244.1.2", "10.244.2.2", "203.0.113.2"
CLUSTER_IP, NODE_PORT = "10.96.0.31", 30090


class Lab:
    """The namespaces of the IP plan, wired, with the endpoint's server listening."""

    def __init__(self, spaces: Namespaces) -> None:
        self.node, self.pod, self.client, self.ext = (spaces.add(r) for r in ("node", "pod", "client", "ext"))
        run(["ip", "netns", "exec", self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1"])  # the node's own
        link(self.node, "veth1", "10.244.1.1/24", self.pod, "eth0", f"{POD_IP}/24")
        link(self.node, "veth2", "10.244.2.1/24", self.client, "eth0", f"{CLIENT_POD_IP}/24")
        link(self.node, "eth0", "203.0.113.1/24", self.ext, "eth0", f"{EXT_IP}/24")
        run(["ip", "-n", self.node, "addr", "add", f"{NODE_IP}/16", "dev", "eth0"])
        for ns, gateway in ((self.pod, "10.244.1.1"), (self.client, "10.244.2.1"), (self.ext, "203.0.113.1")):
            run(["ip", "-n", ns, "route", "add", "default", "via", gateway])
        serve(spaces, self.pod, "pod")

    def sync(self, backend_class, services, slices, **settings) -> backends.ProxyBackend:
        """A backend of this node with these NodeSettings, after one full sync of the objects."""
        defaults = dict(cluster_cidr=CLUSTER_CIDR, node_ips=("10.244.1.1", "10.244.2.1", NODE_IP, "203.0.113.1"))
        backend = backend_class(backends.NodeSettings(NODE, **{**defaults, **settings}))
        with inside(self.node):
            backend.sync(ProxyState.from_objects(services, slices, NODE), None)
        return backend


def web(**spec) -> tuple[list, list]:
    """One NodePort Service with the endpoint pod behind it."""
    service = svc("default", "web", CLUSTER_IP, type=spec.pop("type", "NodePort"),
                  ports=[{"name": "p80", "port": 80, "targetPort": 8080, "nodePort": NODE_PORT}], **spec)
    return [service], [eps("default", "web", [(POD_IP, NODE)])]


@BACKENDS
@pytest.mark.parametrize("masquerade_all", [False, True], ids=["default", "masquerade-all"])
def test_masquerade_all_hides_the_pod_client_behind_the_node(netns, backend_class, masquerade_all):
    """A pod (inside the cluster CIDR) reaching a ClusterIP keeps its address by default; with
    --masquerade-all the endpoint sees the node's address toward it instead."""
    lab = Lab(netns)
    lab.sync(backend_class, *web(), masquerade_all=masquerade_all)
    seen = "10.244.1.1" if masquerade_all else CLIENT_POD_IP
    assert ask(lab.client, CLUSTER_IP, 80) == f"pod {seen}"


@BACKENDS
@pytest.mark.parametrize("service_cidrs", [(), ("10.96.0.0/12",)], ids=["no-service-cidr", "service-cidr"])
def test_unallocated_service_cidr_address_is_dropped_in_nftables_mode(netns, backend_class, service_cidrs):
    """nftables mode with the Service CIDR known (--service-cidr) drops a new connection to an
    address of it that no Service holds (upstream's cluster-ips-check); without it, and in
    iptables mode (upstream has no such drop), the packet leaves the node unchanged, here toward
    the external side, whose namespace holds that address and answers."""
    lab = Lab(netns)
    unallocated = "10.96.0.99"
    run(["ip", "-n", lab.node, "route", "add", "10.96.0.0/12", "via", EXT_IP])  # as a cluster routes it
    run(["ip", "-n", lab.ext, "addr", "add", f"{unallocated}/32", "dev", "lo"])
    serve(netns, lab.ext, "ext")
    lab.sync(backend_class, *web(), service_cidrs=service_cidrs)
    assert ask(lab.client, CLUSTER_IP, 80) == f"pod {CLIENT_POD_IP}"  # an allocated ClusterIP still works
    if backend_class is NftablesBackend and service_cidrs:
        for source in (lab.client, lab.node):  # forwarded (filter-forward) and the node's own (filter-output)
            with pytest.raises(TimeoutError):
                ask(source, unallocated, 8080, timeout=1)
    else:
        assert ask(lab.client, unallocated, 8080) == f"ext {CLIENT_POD_IP}"
        assert ask(lab.node, unallocated, 8080).startswith("ext ")


def load_balancer(name: str, cluster_ip: str, lb_ip: str, node_port: int, ranges: list[str]):
    return svc("default", name, cluster_ip, type="LoadBalancer", loadBalancerSourceRanges=ranges,
               ports=[{"name": "p80", "port": 80, "targetPort": 8080, "nodePort": node_port}],
               status={"loadBalancer": {"ingress": [{"ip": lb_ip}]}})


@BACKENDS
def test_space_padded_load_balancer_source_ranges_are_trimmed(netns, backend_class):
    """Source ranges as the API server accepts them, space-padded: the external client inside
    " 203.0.113.0/25 " reaches the first LoadBalancer IP; "\\t10.0.0.0/8 " keeps it out of the second."""
    lab = Lab(netns)
    for lb_ip in ("203.0.113.10", "203.0.113.11"):
        run(["ip", "-n", lab.ext, "route", "add", lb_ip, "via", "203.0.113.1"])  # the cloud LB's job, short-cut
    services = [load_balancer("open", "10.96.0.41", "203.0.113.10", 30091, [" 203.0.113.0/25 "]),
                load_balancer("closed", "10.96.0.42", "203.0.113.11", 30092, ["\t10.0.0.0/8 "])]
    slices = [eps("default", name, [(POD_IP, NODE)]) for name in ("open", "closed")]
    lab.sync(backend_class, services, slices)
    assert ask(lab.ext, "203.0.113.10", 80) == "pod 10.244.1.1"  # admitted, masqueraded (Cluster policy)
    with pytest.raises(TimeoutError):
        ask(lab.ext, "203.0.113.11", 80, timeout=1)


@BACKENDS
@pytest.mark.parametrize("cluster_cidr", [CLUSTER_CIDR, None], ids=["cluster-cidr", "no-detector"])
def test_without_cluster_cidr_off_cluster_clients_keep_their_address(netns, backend_class, cluster_cidr):
    """--cluster-cidr 10.244.0.0/16: a client outside it reaching a ClusterIP through the node is
    masqueraded; --cluster-cidr '' (no local-traffic detector): it is not, and pods are not either."""
    lab = Lab(netns)
    run(["ip", "-n", lab.ext, "route", "add", "10.96.0.0/12", "via", "203.0.113.1"])
    lab.sync(backend_class, *web(), cluster_cidr=cluster_cidr)
    assert ask(lab.ext, CLUSTER_IP, 80) == f"pod {'10.244.1.1' if cluster_cidr else EXT_IP}"
    assert ask(lab.client, CLUSTER_IP, 80) == f"pod {CLIENT_POD_IP}"


def route_localnet(ns: str) -> str:
    return run(["ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip()


@pytest.mark.parametrize("settings", [{}, {"nodeport_addresses": ("127.0.0.1",)}, {"localhost_nodeports": False}],
                         ids=["default", "nodeport-addresses-127", "localhost-nodeports-false"])
def test_localhost_nodeports_in_iptables_mode_set_route_localnet_in_the_node_only(netns, settings):
    """iptables mode, upstream's default: the node reaches its NodePort on 127.0.0.1 (masqueraded:
    route_localnet=1 in the node's namespace lets the DNATed packet leave loopback), and so with
    --nodeport-addresses 127.0.0.0/8 (then not on 172.18.0.2). --iptables-localhost-nodeports=false:
    refused, route_localnet left alone. The machine's own namespace is never touched."""
    with open("/proc/sys/net/ipv4/conf/all/route_localnet") as sysctl:
        root_before = sysctl.read()
    lab = Lab(netns)
    lab.sync(IptablesBackend, *web(), **settings)
    if settings.get("localhost_nodeports", True):
        assert ask(lab.node, "127.0.0.1", NODE_PORT) == "pod 10.244.1.1"
        assert route_localnet(lab.node) == "1"
    else:
        with pytest.raises(ConnectionRefusedError):  # no DNAT: nothing listens on the node itself
            ask(lab.node, "127.0.0.1", NODE_PORT)
        assert route_localnet(lab.node) == "0"
    if settings.get("nodeport_addresses"):
        with pytest.raises(ConnectionRefusedError):
            ask(lab.node, NODE_IP, NODE_PORT)
    else:
        assert ask(lab.node, NODE_IP, NODE_PORT) == "pod 10.244.1.1"
    with open("/proc/sys/net/ipv4/conf/all/route_localnet") as sysctl:
        assert sysctl.read() == root_before


def test_nftables_mode_has_no_localhost_nodeports(netns):
    """As upstream: nftables NodePorts match every local address but 127.0.0.0/8."""
    lab = Lab(netns)
    lab.sync(NftablesBackend, *web())
    assert ask(lab.node, NODE_IP, NODE_PORT) == "pod 10.244.1.1"
    with pytest.raises(ConnectionRefusedError):
        ask(lab.node, "127.0.0.1", NODE_PORT)
    assert route_localnet(lab.node) == "0"
