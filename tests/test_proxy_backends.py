"""Both kube-proxy backends against the real kernel: checks in a scratch namespace, and SCTP
Services with real SCTP packets.

SCTP: this kernel has SCTP connection tracking, NAT and the iptables `sctp` match built in, but no
SCTP sockets (CONFIG_IP_SCTP unset, see README). So the packets are made by hand and sent and
received on raw IP sockets (protocol 132): an SCTP INIT chunk with its CRC32c, which conntrack
checks. The endpoint's raw socket sees the packet as kube-proxy's rules left it: destination
rewritten to the endpoint, source masqueraded for Cluster-policy NodePort traffic.

Namespaces: node (the rules), pod 10.244.1.2 behind it, ext 203.0.113.2 outside; node's own
address 172.18.0.2 sits on its outside interface.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct

import dataclasses

import pytest

from testbed.proxy import backends, nodeaddrs

from testbed.proxy import kernel
from testbed.proxy.iptables.backend import IptablesBackend
from testbed.proxy.model import ProxyState
from testbed.proxy.nftables.backend import NftablesBackend
from tests.netns import ask, inside, link, netns_fixture, run, serve
from tests.proxy_fixtures import CLUSTER_CIDR, NODE, NODE_IP, eps, golden_objects, spn, svc

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "iptables-restore")),
    reason="needs root, ip, nft and iptables-restore (network namespaces)")]
netns = netns_fixture("pxb")
BACKENDS = pytest.mark.parametrize("backend_class", [IptablesBackend, NftablesBackend], ids=["iptables", "nftables"])


def kube_rules_in(ns: str) -> str:
    """Whatever kube-proxy rules the namespace holds, in either family of tools."""
    iptables = run(["ip", "netns", "exec", ns, "iptables-save"]).stdout
    nft = run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"]).stdout
    return "\n".join(line for line in (iptables + nft).splitlines() if "KUBE-" in line or "kube-proxy" in line)


@BACKENDS
def test_check_loads_into_a_scratch_namespace(netns, backend_class):
    """backend.check() asks the kernel about a ruleset without touching the node: a Service
    annotated svclab.io/fault: invalid-rules fails it, the same state without it passes."""
    node = netns.add("node")
    state = ProxyState.from_objects(*golden_objects(), NODE)
    bad = spn("ns1", "svc1")
    state.services[bad] = dataclasses.replace(state.services[bad], invalid_rule=True)
    backend = backend_class(backends.NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,)))
    with inside(node):
        with pytest.raises(kernel.RulesFailed, match="svclab-fault-no-such-chain"):
            backend.check(state)
        backend.check(state.without({bad}))
        backend.check(state.only({spn("ns2", "svc2")}))
    assert kube_rules_in(node) == ""  # the node saw none of it

SCTP = 132
CLUSTER_IP, PORT, NODE_PORT, POD_IP = "10.96.0.30", 3868, 30868, "10.244.1.2"


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), SCTP's checksum (RFC 9260 appendix A)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def sctp_init(source_port: int, destination_port: int) -> bytes:
    """An SCTP packet holding one INIT chunk (verification tag 0, as INIT requires)."""
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, 0x5C7B1AB, 65535, 1, 1, 1)  # INIT: tag, a_rwnd, streams, TSN
    header = struct.pack("!HHII", source_port, destination_port, 0, 0)
    checksum = crc32c(header + chunk)
    return header[:8] + struct.pack("<I", checksum) + chunk  # the CRC goes on the wire little-endian


def raw_socket(ns: str) -> socket.socket:
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, SCTP)
    sock.settimeout(2)
    return sock


def received(sock: socket.socket) -> tuple[str, str, int]:
    """(source IP, destination IP, destination port) of the next SCTP packet the socket sees."""
    data = sock.recv(2048)
    header_length = (data[0] & 0x0F) * 4
    _, destination_port = struct.unpack("!HH", data[header_length:header_length + 4])
    return socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20]), destination_port


@BACKENDS
def test_dump_shows_what_sync_programmed_and_cleanup_removes_it(netns, backend_class):
    """`svclab rules` prints backend.dump(): the Service's rules are in it after a sync, and
    neither they nor anything of kube-proxy's are left after cleanup()."""
    node = netns.add("node")
    backend = backend_class(backends.NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,)))
    with inside(node):
        assert "10.96.0.11" not in backend.dump()
        backend.sync(ProxyState.from_objects(*golden_objects(), NODE), None)
        dumped = backend.dump()
        backend.cleanup()
        after = backend.dump()
    assert "10.96.0.11" in dumped and "10.244.1.2" in dumped  # svc1's ClusterIP and one endpoint
    assert "ns1/svc1" in dumped  # iptables: rule comments; nftables: chain names
    assert "10.96.0.11" not in after and kube_rules_in(node) == ""


@BACKENDS
def test_sctp_service_dnats_real_sctp_packets(netns, backend_class):
    node, pod, ext = netns.add("node"), netns.add("pod"), netns.add("ext")
    run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1"])  # the node namespace's own
    link(node, "veth1", "10.244.1.1/24", pod, "eth0", f"{POD_IP}/24")
    link(node, "eth0", "203.0.113.1/24", ext, "eth0", "203.0.113.2/24")
    run(["ip", "-n", node, "addr", "add", f"{NODE_IP}/16", "dev", "eth0"])
    run(["ip", "-n", node, "route", "add", "10.96.0.0/12", "dev", "eth0", "src", NODE_IP])
    for ns, gateway in ((pod, "10.244.1.1"), (ext, "203.0.113.1")):
        run(["ip", "-n", ns, "route", "add", "default", "via", gateway])
    service = svc("default", "diameter", CLUSTER_IP, type="NodePort", ports=[
        {"name": "sig", "port": PORT, "targetPort": PORT, "protocol": "SCTP", "nodePort": NODE_PORT}])
    endpoints = eps("default", "diameter", [(POD_IP, NODE)], ports=[{"name": "sig", "port": PORT, "protocol": "SCTP"}])
    backend = backend_class(backends.NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,)))
    with inside(node):
        backend.sync(ProxyState.from_objects([service], [endpoints], NODE), None)

    server = raw_socket(pod)
    with server:
        # NodePort from outside: to the endpoint, the client masqueraded (externalTrafficPolicy Cluster)
        with raw_socket(ext) as client:
            client.sendto(sctp_init(40000, NODE_PORT), (NODE_IP, 0))
        assert received(server) == ("10.244.1.1", POD_IP, PORT)
        # ClusterIP from the node itself (OUTPUT): to the endpoint
        with raw_socket(node) as client:
            client.sendto(sctp_init(40001, PORT), (CLUSTER_IP, 0))
        source, destination, port = received(server)
        assert (destination, port) == (POD_IP, PORT)


@BACKENDS
def test_nodeport_addresses_accept_nodeports_on_those_addresses_only(netns, backend_class):
    """--nodeport-addresses 172.18.0.0/16: the node's address there takes NodePorts; its other
    address (203.0.113.1, toward the outside client) does not."""
    node, pod, ext = netns.add("node"), netns.add("pod"), netns.add("ext")
    run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    link(node, "veth1", "10.244.1.1/24", pod, "eth0", f"{POD_IP}/24")
    link(node, "eth0", "203.0.113.1/24", ext, "eth0", "203.0.113.2/24")
    run(["ip", "-n", node, "addr", "add", f"{NODE_IP}/16", "dev", "eth0"])
    for ns, gateway in ((pod, "10.244.1.1"), (ext, "203.0.113.1")):
        run(["ip", "-n", ns, "route", "add", "default", "via", gateway])
    serve(netns, pod, "pod")
    with inside(node):
        node_ips = nodeaddrs.local_ipv4_addresses()
    assert node_ips == ("10.244.1.1", "172.18.0.2", "203.0.113.1")  # found in the namespace, loopback left out
    only = nodeaddrs.within(node_ips, nodeaddrs.parse_cidrs("172.18.0.0/16").ipv4)
    assert only == ("172.18.0.2",)
    web = svc("default", "web", "10.96.0.31", type="NodePort",
              ports=[{"name": "p80", "port": 80, "targetPort": 8080, "nodePort": 30090}])
    backend = backends.create(backend_class.name, backends.NodeSettings(NODE, CLUSTER_CIDR, node_ips, only))
    with inside(node):
        backend.sync(ProxyState.from_objects([web], [eps("default", "web", [(POD_IP, NODE)])], NODE), None)
    assert ask(ext, NODE_IP, 30090) == "pod 10.244.1.1"  # DNAT, masqueraded (Cluster policy)
    with pytest.raises(ConnectionRefusedError):  # nothing DNATs it, and nothing listens on the node
        ask(ext, "203.0.113.1", 30090)


def test_parse_cidrs_names_the_bad_one():
    assert nodeaddrs.parse_cidrs("10.0.0.0/8, 172.18.0.5/16").ipv4 == ("10.0.0.0/8", "172.18.0.0/16")
    assert nodeaddrs.parse_cidrs("") == ((), ())
    assert nodeaddrs.parse_cidrs("fd00::/64,10.0.0.0/8") == (("10.0.0.0/8",), ("fd00::/64",))
    with pytest.raises(ValueError, match="--nodeport-addresses: '10.0.0.300/8' is not a CIDR"):
        nodeaddrs.parse_cidrs("10.0.0.0/8,10.0.0.300/8")
    with pytest.raises(ValueError, match="--service-cidr: 'x' is not a CIDR"):
        nodeaddrs.parse_cidrs("x", "--service-cidr")
