"""Pod network plumbing (testbed.node.podnet) on real namespaces.

Every namespace a test makes is named pntest<pid>-...; interfaces live only inside those
namespaces. The fixture removes all of them when the test ends, pass or fail.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from pyroute2 import IPRoute, netns

from testbed.node.podnet import (
    NETNS_DIR, NodeBridge, PodNetworkError, check_ifname, check_netns_name, entered_netns, remove_netns,
)

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

PREFIX = f"pntest{os.getpid()}"
CIDR = "10.244.1.0/24"
GATEWAY = "10.244.1.1"


def run_in(ns: str, *cmd: str, timeout: float = 15, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout, **kw)


def ping(ns: str, ip: str) -> bool:
    return run_in(ns, "ping", "-c1", "-W1", ip).returncode == 0


def links(ns: str) -> set[str]:
    with IPRoute(netns=ns) as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.link("dump")}


def my_netns() -> set[str]:
    return {n for n in os.listdir(NETNS_DIR) if n.startswith(PREFIX + "-")} if os.path.isdir(NETNS_DIR) else set()


class Node:
    """A node namespace with cni0, and helpers that name pods and remember them for cleanup."""

    def __init__(self) -> None:
        self.name = f"{PREFIX}-node"
        self.count = 0
        netns.create(self.name)
        self.bridge = NodeBridge(self.name, CIDR)
        try:
            self.bridge.ensure()
        except BaseException:
            self.bridge.close()
            netns.remove(self.name)
            raise

    def pod(self, ip: str | None = None) -> tuple[str, str, str]:
        """Add a pod; returns (netns name, IP, host veth name)."""
        self.count += 1
        name, host = f"{PREFIX}-p{self.count}", f"pnt{self.count:08x}"
        ip = ip or f"10.244.1.{self.count + 1}"
        self.bridge.add_pod(name, ip, host)
        return name, ip, host

    def cleanup(self) -> None:
        try:
            for name in my_netns() - {self.name}:
                self.bridge.remove_pod(name)
            self.bridge.settle()
        finally:
            self.bridge.close()
            for name in sorted(my_netns(), key=lambda n: n == self.name):  # whatever is left, the node last
                try:
                    netns.remove(name)
                except OSError as e:
                    print(f"cleanup: {name}: {e}")


@pytest.fixture
def node():
    n = Node()
    try:
        yield n
    finally:
        n.cleanup()
    assert not my_netns()


def test_two_pods_ping_each_other_and_the_gateway(node):
    a, a_ip, _ = node.pod()
    b, b_ip, _ = node.pod()
    assert ping(a, b_ip)
    assert ping(b, a_ip)
    assert ping(a, GATEWAY)
    assert ping(node.name, a_ip)  # the node reaches its pods through cni0


def test_pod_layout(node):
    pod, ip, host = node.pod()
    with IPRoute(netns=pod) as ipr:
        assert {link.get_attr("IFLA_IFNAME") for link in ipr.link("dump")} == {"lo", "eth0"}
        eth0 = ipr.link("get", ifname="eth0")[0]
        assert eth0["flags"] & 1
        addresses = ipr.addr("dump", index=eth0["index"])
        assert [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in addresses] == [(ip, 24)]
        default = [r for r in ipr.route("dump", family=2) if r["dst_len"] == 0 and r["table"] == 254]
        assert [r.get_attr("RTA_GATEWAY") for r in default] == [GATEWAY]
    # IPv4 only: no IPv6 address on eth0, nor on the node's side of the pair
    assert run_in(pod, "ip", "-6", "-o", "addr", "show", "dev", "eth0").stdout == ""
    assert run_in(node.name, "ip", "-6", "-o", "addr", "show", "dev", host).stdout == ""
    sysctls = run_in(pod, "sysctl", "-n", "net.ipv4.ip_unprivileged_port_start", "net.ipv4.ip_forward").stdout.split()
    assert sysctls == ["0", "0"]
    assert run_in(node.name, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"


SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(4)
s.settimeout(10)
print("listening", flush=True)
for _ in range(int(sys.argv[1])):
    c, peer = s.accept()
    c.sendall(peer[0].encode())
    c.close()
"""

CLIENT = """
import socket, sys, time
deadline = time.monotonic() + 5
while True:
    try:
        s = socket.create_connection((sys.argv[1], 80), timeout=float(sys.argv[2]))
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
print(s.recv(100).decode())
"""


def start_server(pod: str, connections: int = 1, user: bool = False) -> subprocess.Popen:
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if user else []
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod, *prefix, sys.executable, "-c", SERVER, str(connections)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "listening", proc.stderr.read()
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def connect(pod: str, ip: str, timeout: float = 2) -> subprocess.CompletedProcess:
    return run_in(pod, sys.executable, "-c", CLIENT, ip, str(timeout))


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_tcp_between_pods_to_an_unprivileged_server_on_port_80(node):
    a, a_ip, _ = node.pod()
    b, b_ip, _ = node.pod()
    server = start_server(b, user=True)  # uid 65534 binds port 80: ip_unprivileged_port_start=0
    try:
        result = connect(a, b_ip)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == a_ip  # no NAT between pods
        server.wait(10)
    finally:
        stop(server)


def test_hairpin_is_on_for_every_pod_port(node):
    ports = [node.pod()[2] for _ in range(3)]
    out = subprocess.run(["bridge", "-n", node.name, "-d", "link", "show"], capture_output=True, text=True,
                         timeout=10).stdout
    for port in ports:
        block = out.split(f": {port}@")[1].split("\n", 2)[:2]
        assert "master cni0" in block[0]
        assert "hairpin on" in block[1]


@pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables")
def test_a_pod_reaches_itself_through_a_service_ip(node):
    """What hairpin mode is for: DNAT on the node sends the pod's packet back out its own port."""
    pod, ip, host = node.pod()
    vip = "10.96.0.10"
    for rule in (f"PREROUTING -d {vip}/32 -p tcp --dport 80 -j DNAT --to-destination {ip}:80",
                 f"POSTROUTING -s {ip}/32 -d {ip}/32 -j MASQUERADE"):
        done = run_in(node.name, "iptables", "-t", "nat", "-A", *rule.split())
        assert done.returncode == 0, done.stderr
    server = start_server(pod, connections=2)
    try:
        result = connect(pod, vip)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == GATEWAY  # masqueraded, as kube-proxy does for hairpin traffic
        # and without hairpin the same connection fails: the flag is what makes it work
        subprocess.run(["bridge", "-n", node.name, "link", "set", "dev", host, "hairpin", "off"],
                       check=True, timeout=10)
        assert connect(pod, vip, timeout=1).returncode != 0
    finally:
        stop(server)


def test_gateway_mac_is_fixed_and_ensure_is_idempotent(node):
    mac = "0a:58:0a:f4:01:01"
    with IPRoute(netns=node.name) as ipr:
        assert ipr.link("get", ifname="cni0")[0].get_attr("IFLA_ADDRESS") == mac
        node.pod()
        node.pod()
        node.bridge.ensure()
        assert ipr.link("get", ifname="cni0")[0].get_attr("IFLA_ADDRESS") == mac
        index = ipr.link_lookup(ifname="cni0")[0]
        assert [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.addr("dump", index=index)] == [(GATEWAY, 24)]
    with pytest.raises(PodNetworkError, match="has address 10.244.1.1/24, expected 10.244.2.1/24"):
        NodeBridge(node.name, "10.244.2.0/24").ensure()


def test_remove_pod_removes_the_netns_and_host_veth(node):
    pod, ip, host = node.pod()
    keep, keep_ip, _ = node.pod()
    node.bridge.remove_pod(pod, wait=True)
    assert pod not in my_netns()
    assert host not in links(node.name)
    node.bridge.remove_pod(pod)  # idempotent
    node.bridge.remove_pod(pod, host, wait=True)
    assert ping(keep, GATEWAY)
    # a NodeBridge that did not add the pod (a restarted kubelet) finds the host end itself
    other = NodeBridge(node.name, CIDR)
    try:
        other.remove_pod(keep, wait=True)
    finally:
        other.close()
    assert keep not in my_netns()
    assert links(node.name) == {"lo", "cni0"}


def test_default_remove_lets_the_kernel_reap_and_a_name_can_be_reused_at_once(node):
    pod, ip, host = node.pod()
    node.bridge.remove_pod(pod)
    assert pod not in my_netns()
    node.bridge.add_pod(pod, ip, host)  # waits for the old host end to vanish first
    assert ping(pod, GATEWAY)


def test_host_end_of_a_namespace_kept_alive_is_deleted_by_settle(node):
    pod, ip, host = node.pod()
    holder = os.open(os.path.join(NETNS_DIR, pod), os.O_RDONLY)  # keeps the namespace alive
    try:
        node.bridge.remove_pod(pod)
        assert host in links(node.name)
        node.bridge.settle(timeout=0.2)
        assert host not in links(node.name)
    finally:
        os.close(holder)


def test_add_and_remove_50_pods_leaves_nothing_behind(node):
    before = links(node.name)
    names = [node.pod()[0] for _ in range(50)]
    assert len(links(node.name)) == len(before) + 50
    assert ping(names[0], "10.244.1.51")
    for name in names:
        node.bridge.remove_pod(name)
    node.bridge.settle()
    assert links(node.name) == before == {"lo", "cni0"}
    assert my_netns() == {node.name}


def test_pods_added_from_threads(node):
    own = os.stat("/proc/thread-self/ns/net").st_ino
    errors: list[BaseException] = []

    def worker(first: int) -> None:
        try:
            for i in range(first, first + 10):
                node.bridge.add_pod(f"{PREFIX}-t{i}", f"10.244.1.{100 + i}", f"pntt{i:04d}")
            assert os.stat("/proc/thread-self/ns/net").st_ino == own
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k * 10,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert os.stat("/proc/thread-self/ns/net").st_ino == own
    assert ping(f"{PREFIX}-t0", "10.244.1.139")
    assert len(links(node.name)) == 2 + 40


def test_failures_say_what_failed_and_leave_nothing(node):
    pod, ip, host = node.pod()
    with pytest.raises(PodNetworkError) as exc:
        node.bridge.add_pod(f"{PREFIX}-x", "10.244.1.200", host)  # host veth name taken
    assert exc.value.errno == errno.EEXIST
    assert f"{PREFIX}-x" in str(exc.value) and host in str(exc.value) and "create veth" in str(exc.value)
    assert f"{PREFIX}-x" not in my_netns()
    with pytest.raises(PodNetworkError) as exc:
        node.bridge.add_pod(pod, "10.244.1.201", "pntfresh")  # netns exists
    assert exc.value.errno == errno.EEXIST and pod in str(exc.value)
    assert "pntfresh" not in links(node.name)
    assert ping(pod, GATEWAY)  # the existing pod is untouched
    with pytest.raises(PodNetworkError, match="node netns pntest-missing"):
        NodeBridge("pntest-missing", CIDR).ensure()


@pytest.mark.parametrize("name", ["", "a" * 16, "veth/1", "eth 0", ".", "..", "-x", "a:b", None])
def test_invalid_interface_names(name):
    with pytest.raises(ValueError, match="interface name"):
        check_ifname(name)


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "x" * 256, "a b", None])
def test_invalid_netns_names(name):
    with pytest.raises(ValueError, match="netns name"):
        check_netns_name(name)


def test_invalid_arguments_raise_value_error_before_touching_anything(node):
    before = my_netns()
    bad = [
        (f"{PREFIX}-v", "10.244.1.9", "veth0123456789ab"),  # 16 characters
        (f"{PREFIX}/v", "10.244.1.9", "pntv"),
        (f"{PREFIX}-v", "10.244.2.9", "pntv"),  # outside the pod CIDR
        (f"{PREFIX}-v", GATEWAY, "pntv"),
        (f"{PREFIX}-v", "10.244.1.255", "pntv"),
        (f"{PREFIX}-v", "10.244.1.x", "pntv"),
        (f"{PREFIX}-v", "10.244.1.9", "cni0"),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            node.bridge.add_pod(*args)
    with pytest.raises(ValueError):
        node.bridge.remove_pod("../etc")
    for args in [("n", "10.244.1.0/33"), ("n", "10.244.1.1/24"), ("n", "10.244.1.0/31"),
                 ("n", CIDR, "bridge-name-too-long"), ("a/b", CIDR)]:
        with pytest.raises(ValueError):
            NodeBridge(*args)
    assert my_netns() == before
    assert links(node.name) == {"lo", "cni0"}


def test_entered_netns_and_remove_netns(node):
    pod, ip, _ = node.pod()
    own = os.stat("/proc/thread-self/ns/net").st_ino
    with entered_netns(pod):
        assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat(os.path.join(NETNS_DIR, pod)).st_ino
        listener = socket.socket()
    try:
        listener.bind((ip, 0))  # the socket lives in the pod, where the pod's address is
    finally:
        listener.close()
    assert os.stat("/proc/thread-self/ns/net").st_ino == own
    with pytest.raises(RuntimeError), entered_netns(pod):
        raise RuntimeError("restores the namespace on errors too")
    assert os.stat("/proc/thread-self/ns/net").st_ino == own
    with pytest.raises(PodNetworkError, match="pntest-missing"):
        with entered_netns("pntest-missing"):
            pass
    remove_netns(pod)
    remove_netns(pod)
    assert pod not in my_netns()


def test_add_pod_cost(node):
    """Not a benchmark (bench/podnet.py is): a guard against falling back to forks."""
    node.pod()
    start = time.perf_counter()
    for _ in range(20):
        node.pod()
    assert (time.perf_counter() - start) / 20 < 0.05
