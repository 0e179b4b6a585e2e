"""The cluster network (testbed.cluster.net) on real Mininet, OVS and namespaces.

Every test uses its own cluster name ("t" + 4 random letters) and its own state
directory, and removes what it made in a finally block / fixture, so the tests can run
next to other clusters on the same machine. Test traffic stays inside the testbed's
namespaces and every command is bounded by a timeout.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.cluster.net import ClusterExistsError, ClusterNetwork
from testbed.cluster.netclean import clean, find_leftovers, lock_path
from testbed.cluster.topo import Names, TopologyConfig
from testbed.naming import check_cluster_name as validate_cluster_name

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def _mininet_importable() -> bool:
    try:
        import mininet.net  # noqa: F401
    except ImportError:
        return False
    return True


def _ovs_running() -> bool:
    try:
        return subprocess.run(["ovs-vsctl", "-t", "2", "show"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_testbed_here = pytest.mark.skipif(
    os.geteuid() != 0 or not _mininet_importable() or not _ovs_running(),
    reason="needs root, Debian's Mininet importable and Open vSwitch running (make setup)",
)


def needs_testbed(test):
    """The kernel tier: root, Mininet and Open vSwitch (a network, no cluster)."""
    return pytest.mark.kernel(_testbed_here(test))


def unique_name(suffix: str = "") -> str:
    return "t" + "".join(random.choices(string.ascii_lowercase, k=4)) + suffix


# --- helpers: traffic inside the testbed, bounded ---------------------------------------------

SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4)
s.settimeout(10)
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(10)
n = 0
while True:
    d = c.recv(65536)
    if not d:
        break
    n += len(d)
c.sendall(str(n).encode())
c.close()
"""

CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.settimeout(5)
c.sendall(b"x" * int(sys.argv[3]))
c.shutdown(socket.SHUT_WR)
print(c.recv(100).decode())
"""


def in_netns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def tcp_works(net: ClusterNetwork, src: str, dst: str, port: int = 5001, size: int = 300_000) -> bool:
    """A TCP transfer from host src to host dst (through the named netns), both bounded."""
    dst_ip = net.client_ip if dst == "client" else net.router_node_ip if dst == "gw" else net.node_ip(dst)
    server = subprocess.Popen(
        in_netns(net.netns(dst), "timeout", "15", sys.executable, "-c", SERVER, str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "listening", server.stderr.read()
        res = subprocess.run(
            in_netns(net.netns(src), "timeout", "10", sys.executable, "-c", CLIENT, dst_ip, str(port), str(size)),
            capture_output=True,
            text=True,
            timeout=20,
        )
        return res.returncode == 0 and res.stdout.strip() == str(size)
    finally:
        server.kill()
        server.wait()


def ping(net: ClusterNetwork, src: str, dst_ip: str) -> bool:
    out = net.host(src).cmd(f"ping -c1 -W2 {dst_ip} >/dev/null 2>&1; echo rc=$?")
    return "rc=0" in out


def assert_network_works(net: ClusterNetwork, tcp: bool = True, port: int = 5001) -> None:
    nodes = net.node_names
    for a in nodes:
        for b in nodes:
            if a != b:
                assert ping(net, a, net.node_ip(b)), f"{net.name}: {a} cannot ping {b}"
    assert ping(net, "client", net.node_ip(nodes[-1])), f"{net.name}: client cannot ping {nodes[-1]}"
    assert ping(net, nodes[0], net.client_ip), f"{net.name}: {nodes[0]} cannot ping the client"
    if tcp:
        assert tcp_works(net, nodes[0], nodes[1], port), f"{net.name}: TCP node->node hangs"
        assert tcp_works(net, "client", nodes[1], port + 1), f"{net.name}: TCP client->node hangs"


# --- helpers: what a cluster leaves on the machine ------------------------------------------


def root_interfaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
    return [n for n in names if n.startswith(prefix)]


def ovs_bridges(prefix: str) -> list[str]:
    out = subprocess.run(["ovs-vsctl", "list-br"], capture_output=True, text=True, timeout=10).stdout
    return [b for b in out.split() if b.startswith(prefix)]


def netns_entries(prefix: str) -> list[str]:
    try:
        return [n for n in os.listdir("/run/netns") if n.startswith(prefix)]
    except FileNotFoundError:
        return []


def netns_mounts(prefix: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith("/run/netns/" + prefix)]


def shell_processes(prefix: str) -> list[int]:
    """Live (non-zombie) processes whose argv mentions a Mininet node of the cluster."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.decode(errors="replace").startswith("mininet:" + prefix) for a in argv):
            found.append(int(pid))
    return found


def assert_nothing_left(name: str) -> None:
    prefix = name + "-"
    assert not find_leftovers(name), find_leftovers(name)
    assert root_interfaces(prefix) == []
    assert ovs_bridges(prefix) == []
    assert netns_entries(prefix) == []
    assert netns_mounts(prefix) == []
    assert shell_processes(prefix) == []


def root_sysctls() -> dict[str, str]:
    keys = ["net/ipv4/ip_forward", "net/ipv4/tcp_rmem", "net/ipv4/tcp_wmem", "net/core/rmem_max", "kernel/pty/max"]
    return {k: Path("/proc/sys", k).read_text().strip() for k in keys}


@pytest.fixture
def cluster(tmp_path):
    """Factory: cluster(name=..., **config) -> started ClusterNetwork; all stopped and cleaned after."""
    made: list[ClusterNetwork] = []

    def make(name: str | None = None, **kwargs) -> ClusterNetwork:
        name = name or unique_name()
        net = ClusterNetwork(TopologyConfig(name, **kwargs), tmp_path / name)
        made.append(net)
        net.start()
        return net

    try:
        yield make
    finally:
        for net in made:
            try:
                net.stop()
            finally:
                clean(net.name, net.state_dir)


# --- 1. one cluster ---------------------------------------------------------------------------


@needs_testbed
def test_three_node_cluster_works_and_stop_leaves_nothing(tmp_path):
    name = unique_name()
    before = root_sysctls()
    net = ClusterNetwork(TopologyConfig(name), tmp_path)
    assert not net.state_file.exists()  # no I/O before start()
    try:
        net.start()
        assert net.running and net.datapath in ("user", "kernel")
        assert net.node_names == ["node1", "node2", "node3"]
        assert net.node_ips == {"node1": "172.18.0.2", "node2": "172.18.0.3", "node3": "172.18.0.4"}
        assert (net.client_ip, net.router_node_ip, net.router_external_ip) == ("203.0.113.2", "172.18.0.1", "203.0.113.1")

        # named netns exist, are the hosts' namespaces and work with ip netns exec
        for host in net.host_names:
            ns = net.netns(host)
            assert ns == f"{name}-{host}"
            assert f"/run/netns/{ns}" in netns_mounts(name + "-")
            assert os.stat(f"/run/netns/{ns}").st_ino == os.stat(f"/proc/{net.host(host).pid}/ns/net").st_ino
        out = subprocess.run(in_netns(net.netns("node2"), "ip", "-4", "-o", "addr", "show", "dev", "eth0"),
                             capture_output=True, text=True, timeout=10).stdout
        assert "172.18.0.3/16" in out
        from pyroute2 import NetNS

        with NetNS(net.netns("node2")) as ns:  # pyroute2 opens it by name too
            assert "172.18.0.3" in [a.get_attr("IFA_ADDRESS") for a in ns.get_addr(family=socket.AF_INET)]

        # every root-namespace name carries the cluster name and fits IFNAMSIZ
        ours = root_interfaces(name + "-")
        assert sorted(ours) == sorted(net.root_interfaces + list(net.bridges.values()))
        assert all(len(i) <= 15 for i in ours)
        assert sorted(ovs_bridges(name + "-")) == sorted(net.bridges.values())

        assert_network_works(net)
        assert tcp_works(net, "node3", "node1", 5101)
        assert tcp_works(net, "node1", "client", 5102)  # and back out through the router

        # routing: no default route anywhere, forwarding only in gw, root namespace untouched
        for host in net.host_names:
            assert net.host(host).cmd("ip route show default").strip() == "", host
        assert net.host("gw").cmd("cat /proc/sys/net/ipv4/ip_forward").strip() == "1"
        assert net.host("client").cmd("ip route show 172.18.0.0/16").startswith("172.18.0.0/16 via 203.0.113.1")
        assert net.host("node1").cmd("ip route show 203.0.113.0/24").startswith("203.0.113.0/24 via 172.18.0.1")
        assert root_sysctls() == before

        record = json.loads(net.state_file.read_text())
        assert record["cluster"] == name and record["state"] == "running"
        assert sorted(record["bridges"]) == sorted(net.bridges.values())
        assert set(record["pids"]) == {f"{name}-{h}" for h in net.host_names} | set(net.bridges.values())

        # the same name cannot be started twice
        with pytest.raises(ClusterExistsError):
            ClusterNetwork(TopologyConfig(name), tmp_path / "other").start()
        assert_network_works(net, tcp=False)  # ... and the failed attempt touched nothing
    finally:
        net.stop()
        clean(name, tmp_path)
    assert not net.running
    assert not net.state_file.exists()
    assert_nothing_left(name)
    assert not lock_path(name).exists()
    assert root_sysctls() == before
    net.stop()  # idempotent


@needs_testbed
def test_failed_start_rolls_back(tmp_path, monkeypatch):
    import mininet.net

    real_start = mininet.net.Mininet.start

    def start_then_fail(self):
        real_start(self)  # bridges, ports, netns mounts and shells all exist now
        raise RuntimeError("injected failure")

    monkeypatch.setattr(mininet.net.Mininet, "start", start_then_fail)
    name = unique_name()
    net = ClusterNetwork(TopologyConfig(name, nodes=2), tmp_path)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            net.start()
        assert not net.running and not net.state_file.exists()
        assert_nothing_left(name)
    finally:
        clean(name, tmp_path)


# --- 2. two clusters side by side -------------------------------------------------------------


@needs_testbed
def test_two_clusters_side_by_side(cluster):
    a = cluster()
    b = cluster(a.name + "x", nodes=2)  # "tabcd" and "tabcdx": prefix matching must not mix them
    assert set(a.bridges.values()).isdisjoint(b.bridges.values())
    assert set(a.netns_names.values()).isdisjoint(b.netns_names.values())
    # same addresses in both (isolated L2/L3 domains)
    assert a.node_ip("node1") == b.node_ip("node1")
    assert_network_works(a, port=5201)
    assert_network_works(b, port=5211)

    a.stop()
    assert_nothing_left(a.name)
    assert len(root_interfaces(b.name + "-")) == len(b.root_interfaces) + 2
    assert_network_works(b, port=5221)


# --- 3. kill -9 and clean() -------------------------------------------------------------------

HELPER = r"""
import sys, time
from pathlib import Path
from testbed.cluster.net import ClusterNetwork
from testbed.cluster.topo import TopologyConfig
net = ClusterNetwork(TopologyConfig(sys.argv[1]), Path(sys.argv[2]))
net.start()
net.host("node1").cmd("sleep 600 &")           # a job of a host shell
stray = net.host("node2").popen(["sleep", "601"])  # a process of its own, in node2's netns
print("ready", stray.pid, flush=True)
time.sleep(600)
"""


@needs_testbed
@pytest.mark.parametrize(
    "keep_record, sig",
    [(True, signal.SIGKILL), (False, signal.SIGKILL), (True, signal.SIGSTOP)],
    ids=["with-record", "record-lost", "creator-hung"],
)
def test_clean_after_kill_9(cluster, tmp_path, keep_record, sig):
    """kill -9 the creating process, then clean(). "creator-hung" stops it instead: its
    Mininet shells are still alive then, and clean() must kill them (by verified pid)."""
    name = unique_name()
    state = tmp_path / "victim"
    proc = subprocess.Popen(
        [sys.executable, "-c", HELPER, name, str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    stray = None
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == "ready", proc.stderr.read() if proc.poll() is not None else line
        stray = int(line[1])
        # another cluster, started meanwhile, whose name extends the victim's
        survivor = cluster(name + "z")
        assert_network_works(survivor, tcp=False)

        os.kill(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.wait(timeout=10)
        left = find_leftovers(name)
        assert left.bridges and left.interfaces and left.netns  # debris exists
        if sig == signal.SIGSTOP:
            shells = shell_processes(name + "-")
            assert len(shells) == 7  # 5 hosts + 2 switches
        assert Path(f"/proc/{stray}").exists()
        if not keep_record:
            (state / f"network-{name}.json").unlink()

        result = clean(name, state)
        assert sorted(result.bridges) == sorted([f"{name}-nodes", f"{name}-edge"])
        assert sorted(result.netns) == sorted(f"{name}-{h}" for h in ["node1", "node2", "node3", "client", "gw"])
        assert stray in result.killed
        if sig == signal.SIGSTOP:
            assert set(shells) <= set(result.killed)
            assert lock_path(name).exists()  # still held by the hung creator
        else:
            assert not lock_path(name).exists()
        assert_nothing_left(name)
        assert not (state / f"network-{name}.json").exists()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(stray):
            time.sleep(0.05)
        assert not _alive(stray)

        # idempotent, and the other cluster is untouched
        again = clean(name, state)
        assert not (again.killed or again.bridges or again.interfaces or again.netns)
        assert len(find_leftovers(survivor.name).netns) == 5
        assert_network_works(survivor, port=5301)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        clean(name, state)
        if stray is not None and _alive(stray):
            os.kill(stray, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# --- 4. custom subnets ------------------------------------------------------------------------


@needs_testbed
def test_custom_subnets(cluster):
    net = cluster(nodes=2, node_subnet="192.168.0.0/24", external_subnet="198.51.100.0/24")
    assert net.node_ips == {"node1": "192.168.0.2", "node2": "192.168.0.3"}
    assert (net.client_ip, net.router_node_ip, net.router_external_ip) == (
        "198.51.100.2", "192.168.0.1", "198.51.100.1")
    assert "192.168.0.2/24" in net.host("node1").cmd("ip -4 -o addr show dev eth0")
    assert "198.51.100.1/24" in net.host("gw").cmd("ip -4 -o addr show dev eth1")
    assert_network_works(net, port=5401)


# --- 5. validation (no root needed) -----------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "A", "1abc", "ab-c", "ab_c", "abcdefghi", "with space", "é", None, 7]
)
def test_invalid_cluster_names_raise(bad, tmp_path):
    with pytest.raises(ValueError, match="cluster name"):
        TopologyConfig(bad)
    with pytest.raises(ValueError):
        validate_cluster_name(bad)
    if isinstance(bad, str):
        with pytest.raises(ValueError):
            clean(bad, tmp_path)


@pytest.mark.parametrize("good", ["a", "svclab", "abcdefgh", "a1", "k8s"])
def test_valid_cluster_names(good):
    cfg = TopologyConfig(good)
    assert cfg.name == good
    names = Names(good, 999)
    assert all(len(n) <= 15 for n in names.ports + names.bridges)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nodes": 0},
        {"nodes": True},
        {"nodes": 1000},
        {"node_subnet": "10.0.0.0/30", "nodes": 2},
        {"node_subnet": "not a subnet"},
        {"node_subnet": "172.18.0.1/16"},  # host bits set
        {"node_subnet": "fd00::/64"},
        {"external_subnet": "172.18.5.0/24"},  # inside the node subnet
        {"external_subnet": "203.0.113.0/31"},
        {"datapath": "dpdk"},
    ],
)
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        TopologyConfig("tcfg", **kwargs)


def test_config_addresses_and_names():
    cfg = TopologyConfig("ab", nodes=2, node_subnet="10.1.2.0/23")
    assert cfg.node_subnet == ipaddress.ip_network("10.1.2.0/23")
    assert [cfg.node_ip(1), cfg.node_ip(2), cfg.router_node_ip] == ["10.1.2.2", "10.1.2.3", "10.1.2.1"]
    n = Names("ab", 2)
    assert n.bridges == ["ab-nodes", "ab-edge"]
    assert n.ports == ["ab-n1", "ab-n2", "ab-ngw", "ab-ecl", "ab-egw"]
    assert n.netns("node1") == "ab-node1"
    # prefix matching is unambiguous: cluster "a" never matches cluster "ab"'s names
    for pattern in (Names.bridge_re("a"), Names.root_ifname_re("a"), Names.netns_re("a"), Names.shell_name_re("a")):
        assert not any(pattern.match(x) for x in n.bridges + n.ports + [n.netns(h) for h in n.hosts])
    assert Names.netns_re("ab").match("ab-node1") and not Names.netns_re("ab").match("ab-node1x")
    assert re.fullmatch(r"[0-9a-f]{16}", n.dpid("ab-edge")) and n.dpid("ab-edge") != n.dpid("ab-nodes")
    # constructing a ClusterNetwork does no I/O
    net = ClusterNetwork(cfg, Path("/nonexistent/state"))
    assert not net.running and net.netns("gw") == "ab-gw"
    with pytest.raises(RuntimeError):
        net.host("node1")
    with pytest.raises(KeyError):
        net.netns("node3")
