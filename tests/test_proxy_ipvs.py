"""IPVS mode against the real kernel: virtual services, real servers, ipsets and kube-ipvs0
programmed over netlink in a node namespace, and real TCP through them.

This host's kernel has no IPVS: these tests run in the stock-kernel VM
(`svclab vm -- .venv/bin/python -m pytest -m vm tests/test_proxy_ipvs.py`) and skip elsewhere.
The plan tests at the top are pure and run everywhere.

Namespaces: node (the backend; 10.244.1.1 toward the pods, 203.0.113.1 and 172.18.0.2 toward
the outside), pod1 10.244.1.2 and pod2 10.244.1.3 behind it, ext 203.0.113.2 outside.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from testbed.proxy import backends, kernel
from testbed.proxy.ipvs import names
from testbed.proxy.ipvs.backend import IpvsBackend
from testbed.proxy.ipvs.desired import VirtualServer, plan_service
from testbed.proxy.ipvs.kernel import Netlink
from testbed.proxy.model import ProxyState
from tests.netns import in_ns, inside, link, netns_fixture, run, serve
from tests.proxy_fixtures import CLUSTER_CIDR, NODE, NODE_IP, eps, golden_objects, spn, svc

HAS_IPVS = Path("/proc/net/ip_vs").exists()  # the VM loads ip_vs and its schedulers first
needs_ipvs = [pytest.mark.vm, pytest.mark.kernel, pytest.mark.skipif(
    not HAS_IPVS or os.geteuid() != 0 or not shutil.which("ipvsadm"),
    reason="needs root, ipvsadm and a kernel with IPVS: run in the VM (svclab vm -- pytest -m vm)")]
netns = netns_fixture("ipv")
SETTINGS = backends.NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,))
POD1, POD2 = "10.244.1.2", "10.244.1.3"


def golden_plans():
    state = ProxyState.from_objects(*golden_objects(), NODE)
    return {str(name): plan_service(sp, state.endpoints_of(name), "rr", (NODE_IP,), (NODE_IP,))
            for name, sp in state.services.items()}


@pytest.mark.unit
def test_plan_has_upstreams_virtual_services_and_sets():
    plans = golden_plans()
    svc1 = plans["ns1/svc1:p80"]
    assert [(str(v.key), v.dests) for v in svc1.services] == [
        ("TCP 10.96.0.11:80", ("10.244.1.2:8080", "10.244.2.2:8080"))]
    assert ("KUBE-CLUSTER-IP", ("10.96.0.11", "tcp", 80)) in svc1.entries
    assert ("KUBE-LOOP-BACK", ("10.244.1.2", "tcp", 8080, "10.244.1.2")) in svc1.entries  # local endpoint only
    assert not any(e[1][0] == "10.244.2.2" for e in svc1.entries)
    svc2 = {v.role: v for v in plans["ns2/svc2:p80"].services}
    assert str(svc2["node port"].key) == f"TCP {NODE_IP}:30082"
    assert ("KUBE-NODE-PORT-TCP", (30082,)) in plans["ns2/svc2:p80"].entries
    assert plans["ns5/svc5:p80"].services[0].persistence == 600  # ClientIP affinity
    assert plans["ns4/svc4:p80"].services[0].dests == ()  # no endpoints: a virtual service without real servers
    # externalTrafficPolicy Local: the local endpoint only for external traffic, and the NodePort's
    # port goes into the -LOCAL set (no masquerade)
    svc3 = {v.role: v for v in plans["ns3/svc3:p80"].services}
    assert svc3["node port"].dests == ("10.244.1.4:8080",)
    assert svc3["cluster IP"].dests == ("10.244.1.4:8080", "10.244.2.4:8080")
    assert ("KUBE-NODE-PORT-LOCAL-TCP", (30083,)) in plans["ns3/svc3:p80"].entries
    # Local with no local endpoint: upstream's IPVS mode forwards to the cluster's (iptables mode drops)
    svc7 = {v.role: v for v in plans["ns7/svc7:p80"].services}
    assert svc7["node port"].dests == ("10.244.2.8:8080",)
    # internalTrafficPolicy Local, no local endpoint: no real server
    assert plans["ns8/svc8:p80"].services[0].dests == ()
    svc6 = plans["ns6/svc6:p80"]  # source ranges include the node's network: the node may reach its LB IP
    assert ("KUBE-LOAD-BALANCER-SOURCE-CIDR", ("203.0.113.10", "tcp", 80, "203.0.113.0/25")) in svc6.entries
    assert ("KUBE-LOAD-BALANCER-SOURCE-IP", ("203.0.113.10", "tcp", 80, "203.0.113.10")) in svc6.entries
    assert svc6.no_node_access == ()
    assert plans["ns9/svc9:p80"].bound == {"10.96.0.19", "203.0.113.9"}
    assert "ns0/headless:p80" not in plans


@pytest.mark.unit
def test_unknown_scheduler_is_refused_at_start():
    with pytest.raises(backends.Unsupported, match="--ipvs-scheduler 'fastest': use one of rr, wrr, lc"):
        IpvsBackend(backends.NodeSettings(NODE, ipvs_scheduler="fastest"))
    assert IpvsBackend(backends.NodeSettings(NODE, ipvs_scheduler="sh")).scheduler == "sh"
    assert IpvsBackend(backends.NodeSettings(NODE)).scheduler == "rr"


# ---------------------------------------------------------------- in the kernel (the VM)


def node_with_pods(netns, servers: bool = True) -> tuple[str, str, str, str]:
    node, pod1, pod2, ext = netns.add("node"), netns.add("pod1"), netns.add("pod2"), netns.add("ext")
    run(["ip", "-n", node, "link", "add", "cni0", "type", "bridge"])
    run(["ip", "-n", node, "addr", "add", "10.244.1.1/24", "dev", "cni0"])
    run(["ip", "-n", node, "link", "set", "cni0", "up"])
    for pod, ip in ((pod1, POD1), (pod2, POD2)):
        veth = f"v{ip.rsplit('.', 1)[1]}"
        run(["ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", veth, "netns", node])
        run(["ip", "-n", pod, "addr", "add", f"{ip}/24", "dev", "eth0"])
        run(["ip", "-n", pod, "link", "set", "eth0", "up"])
        run(["ip", "-n", pod, "route", "add", "default", "via", "10.244.1.1"])
        # hairpin on, as svclab's pod network sets it (testbed/node/podnet.py): a pod's reply to
        # itself through a Service (masqueraded to 10.244.1.1) comes back out of its own port
        run(["ip", "-n", node, "link", "set", veth, "master", "cni0", "up"])
        run(["ip", "-n", node, "link", "set", veth, "type", "bridge_slave", "hairpin", "on"])
    link(node, "eth0", "203.0.113.1/24", ext, "eth0", "203.0.113.2/24")
    run(["ip", "-n", node, "addr", "add", f"{NODE_IP}/16", "dev", "eth0"])
    run(["ip", "-n", ext, "route", "add", "default", "via", "203.0.113.1"])
    if servers:
        serve(netns, pod1, "pod1")
        serve(netns, pod2, "pod2")
    return node, pod1, pod2, ext


def ask(ns: str, ip: str, port: int, timeout: float = 3.0) -> str:
    with inside(ns):
        sock = socket.socket()
    with sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        return sock.recv(100).decode()


def web(ip: str = "10.96.0.40", **spec):
    return svc("default", "web", ip, **spec)


def web_eps(*ips: str):
    return eps("default", "web", [(ip, NODE) for ip in ips])


def kernel_view(node: str) -> dict:
    with inside(node), Netlink() as nl:
        services = nl.services()
        return {
            "services": services,
            "dests": {key: nl.real_servers(key) for key in services},
            "bound": nl.bound(nl.dummy_index()) if nl.dummy_index() else set(),
            "cluster-ips": nl.set_members(names.CLUSTER_IP.name) if nl.has_set(names.CLUSTER_IP.name) else None,
        }




def vm_test(fn):
    for mark in reversed(needs_ipvs):
        fn = mark(fn)
    return fn


@vm_test
def test_full_sync_programs_every_virtual_service_and_cleanup_removes_all(netns):
    node = netns.add("node")
    run(["ip", "-n", node, "addr", "add", f"{NODE_IP}/16", "dev", "lo"])
    backend = IpvsBackend(SETTINGS)
    state = ProxyState.from_objects(*golden_objects(), NODE)
    with inside(node):
        counts = backend.sync(state, None)
    view = kernel_view(node)
    expected = {v.key: v for plan in golden_plans().values() for v in plan.services}
    assert set(view["services"]) == set(expected)
    assert counts["ipvs"] == len(expected)
    for key, wanted in expected.items():
        assert view["services"][key] == ("rr", wanted.persistence), key
        assert {a: rs.weight for a, rs in view["dests"][key].items()} == {a: 1 for a in wanted.dests}, key
    assert view["services"][VirtualServer("TCP", "10.96.0.15", 80)] == ("rr", 600)  # ClientIP affinity: persistence
    assert {"10.96.0.11", "10.96.0.19", "203.0.113.9", "203.0.113.10"} <= view["bound"]
    assert ("10.96.0.11", "tcp", 80) in view["cluster-ips"]
    with inside(node):
        assert not backend.needs_full_sync()
        dumped = backend.dump()
        backend.cleanup()
    assert "TCP  10.96.0.11:80 rr" in dumped and "-> 10.244.1.2:8080" in dumped and "KUBE-CLUSTER-IP" in dumped
    after = kernel_view(node)
    assert after["services"] == {} and after["bound"] == set() and after["cluster-ips"] is None
    saved = in_ns(node, "iptables-save").stdout
    assert "KUBE-" not in saved, saved


@vm_test
def test_traffic_balances_masquerades_hairpins_and_refuses_without_endpoints(netns):
    node, pod1, pod2, ext = node_with_pods(netns)
    services = [web(type="NodePort", ports=[{"name": "p80", "port": 80, "targetPort": 8080, "nodePort": 30080}]),
                svc("default", "empty", "10.96.0.41")]
    backend = IpvsBackend(SETTINGS)
    with inside(node):
        backend.sync(ProxyState.from_objects(services, [web_eps(POD1, POD2), eps("default", "empty", [])], NODE), None)
    answers = [ask(pod1, "10.96.0.40", 80).split()[0] for _ in range(4)]
    assert sorted(answers) == ["pod1", "pod1", "pod2", "pod2"]  # rr: one each in turn
    # from outside through the NodePort: masqueraded to the node's address toward the pods
    seen = {ask(ext, NODE_IP, 30080) for _ in range(2)}
    assert seen == {"pod1 10.244.1.1", "pod2 10.244.1.1"}
    # a pod reaching the ClusterIP keeps its address, except when it lands on itself (hairpin: KUBE-LOOP-BACK)
    for _ in range(2):
        name, source = ask(pod1, "10.96.0.40", 80).split()
        assert source == ("10.244.1.1" if name == "pod1" else POD1)
    # no endpoints: IPVS answers port unreachable, the client's connect fails at once
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        ask(pod1, "10.96.0.41", 80)
    assert time.monotonic() - started < 1
    # KUBE-IPVS-FILTER: another port of a Service address is refused, not the node's own service
    with pytest.raises(ConnectionRefusedError):
        ask(pod1, "10.96.0.40", 8080)


@vm_test
def test_affinity_and_scheduler(netns):
    node, pod1, pod2, ext = node_with_pods(netns)
    sticky = web(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    backend = IpvsBackend(backends.NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,), ipvs_scheduler="lc"))
    with inside(node):
        backend.sync(ProxyState.from_objects([sticky], [web_eps(POD1, POD2)], NODE), None)
    assert kernel_view(node)["services"][VirtualServer("TCP", "10.96.0.40", 80)] == ("lc", 60)
    answers = {ask(pod2, "10.96.0.40", 80).split()[0] for _ in range(5)}
    assert len(answers) == 1  # the same pod every time


@vm_test
def test_removed_endpoint_drains_then_goes(netns):
    """The endpoint of an open connection is removed: its real server stays at weight 0 (the
    connection goes on, new ones go elsewhere) until the drain timeout deletes it."""
    node, pod1, pod2, ext = node_with_pods(netns, servers=False)
    echo = "import socket\ns=socket.socket();s.setsockopt(1,2,1);s.bind(('0.0.0.0',8080));s.listen(8)\n" \
           "print('listening',flush=True)\nwhile True:\n c,_=s.accept()\n while (d:=c.recv(100)): c.sendall(d)\n c.close()"
    for pod in (pod1, pod2):
        proc = netns.popen(pod, "python3", "-c", echo)
        assert proc.stdout.readline().strip() == "listening"
    key = VirtualServer("TCP", "10.96.0.40", 80)
    backend = IpvsBackend(backends.NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,), ipvs_drain_timeout=3))
    with inside(node):
        backend.sync(ProxyState.from_objects([web()], [web_eps(POD1)], NODE), None)
    with inside(ext):
        held = socket.create_connection(("10.96.0.40", 80), timeout=3)
    with held:
        held.sendall(b"one")
        assert held.recv(10) == b"one"
        with inside(node):
            tracker_state = ProxyState.from_objects([web()], [web_eps(POD2)], NODE)
            backend.sync(tracker_state, {spn("default", "web")})
        dests = kernel_view(node)["dests"][key]
        assert {a: rs.weight for a, rs in dests.items()} == {f"{POD1}:8080": 0, f"{POD2}:8080": 1}
        assert dests[f"{POD1}:8080"].active == 1
        held.sendall(b"two")  # the established connection still reaches pod1
        assert held.recv(10) == b"two"
        with inside(ext):
            fresh = socket.create_connection(("10.96.0.40", 80), timeout=3)
        with fresh:  # asked while it is open (once closed, IPVS counts it inactive: TIME_WAIT)
            fresh.sendall(b"x")
            assert fresh.recv(10) == b"x"
            new_one = kernel_view(node)["dests"][key][f"{POD2}:8080"]
            assert new_one.active == 1, (new_one, in_ns(node, "ipvsadm", "-Lnc").stdout)  # it went to pod2
        with inside(node), Netlink() as nl:
            assert backend.drainer.process(nl) == 0  # still busy, before the timeout
        time.sleep(3.2)
        with inside(node), Netlink() as nl:
            assert backend.drainer.process(nl) == 1
    assert set(kernel_view(node)["dests"][key]) == {f"{POD2}:8080"}


@vm_test
def test_partial_sync_touches_only_the_changed_service_and_repair_is_full(netns):
    node = netns.add("node")
    run(["ip", "-n", node, "addr", "add", f"{NODE_IP}/16", "dev", "lo"])
    backend = IpvsBackend(SETTINGS)
    services, slices = golden_objects()
    with inside(node):
        backend.sync(ProxyState.from_objects(services, slices, NODE), None)
    # someone changes svc2's real server by hand: a partial sync of svc1 leaves it alone
    in_ns(node, "ipvsadm", "-e", "-t", "10.96.0.12:80", "-r", "10.244.1.3:8080", "-m", "-w", "5")
    slices[0] = eps("ns1", "svc1", [("10.244.1.2", NODE), ("10.244.1.20", NODE)])
    with inside(node):
        backend.sync(ProxyState.from_objects(services, slices, NODE), {spn("ns1", "svc1")})
    view = kernel_view(node)
    svc1 = view["dests"][VirtualServer("TCP", "10.96.0.11", 80)]
    assert {a: rs.weight for a, rs in svc1.items()} == {"10.244.1.2:8080": 1, "10.244.1.20:8080": 1}  # 10.244.2.2 idle: deleted
    assert view["dests"][VirtualServer("TCP", "10.96.0.12", 80)]["10.244.1.3:8080"].weight == 5
    with inside(node):
        backend.sync(ProxyState.from_objects(services, slices, NODE), None)  # a full sync repairs it
    assert kernel_view(node)["dests"][VirtualServer("TCP", "10.96.0.12", 80)]["10.244.1.3:8080"].weight == 1
    for damage in (["ipvsadm", "-C"], ["ip", "link", "del", "kube-ipvs0"], ["iptables", "-t", "nat", "-F"],
                   ["iptables", "-F"]):
        with inside(node):
            assert not backend.needs_full_sync()
        in_ns(node, *damage)
        with inside(node):
            assert backend.needs_full_sync(), damage
            backend.sync(ProxyState.from_objects(services, slices, NODE), None)
        view = kernel_view(node)
        assert len(view["services"]) == len([v for p in golden_plans().values() for v in p.services]), damage
        assert "10.96.0.11" in view["bound"]


@vm_test
def test_check_loads_into_a_scratch_namespace(netns):
    """A Service annotated svclab.io/fault: invalid-rules gets a scheduler the kernel refuses."""
    import dataclasses
    node = netns.add("node")
    state = ProxyState.from_objects(*golden_objects(), NODE)
    bad = spn("ns1", "svc1")
    state.services[bad] = dataclasses.replace(state.services[bad], invalid_rule=True)
    backend = IpvsBackend(SETTINGS)
    with inside(node):
        with pytest.raises(kernel.RulesFailed, match="ipvsadm"):
            backend.check(state)
        backend.check(state.without({bad}))
    assert kernel_view(node)["services"] == {}


@vm_test
def test_kube_proxy_cleanup_removes_ipvs_modes_state_too(netns):
    """`kube-proxy --cleanup` (backends.cleanup_all, node-crash uses it) on a node IPVS mode
    programmed: every mode's cleanup runs, IPVS's included, and nothing of kube-proxy's is left."""
    node = netns.add("node")
    run(["ip", "-n", node, "addr", "add", f"{NODE_IP}/16", "dev", "lo"])
    with inside(node):
        IpvsBackend(SETTINGS).sync(ProxyState.from_objects(*golden_objects(), NODE), None)
        assert backends.cleanup_all(NODE) == ["iptables", "nftables", "ipvs"]
    after = kernel_view(node)
    assert after["services"] == {} and after["bound"] == set() and after["cluster-ips"] is None
    assert "KUBE-" not in in_ns(node, "iptables-save").stdout
    assert in_ns(node, "ipset", "list", "-n").stdout.strip() == ""


@pytest.mark.kernel
def test_ipsets_over_netlink_need_no_ipvs(netns):
    """The ipset half of kernel.py runs on any kernel with ipset (this host's too): members read
    back as written, and a destroyed set is gone (pyroute2 answers lazily: read, not assumed)."""
    node = netns.add("node")
    member = ("10.96.0.11", "tcp", 80)
    with inside(node), Netlink() as nl:
        nl.ensure_sets()
        nl.add_entry((names.CLUSTER_IP.name, member))
        nl.add_entry((names.NODE_PORT["TCP"].name, (30080,)))
        assert nl.set_members(names.CLUSTER_IP.name) == {member}
        assert nl.set_members(names.NODE_PORT["TCP"].name) == {(30080,)}
        nl.destroy_sets()
        assert not nl.has_set(names.CLUSTER_IP.name)
    assert in_ns(node, "ipset", "list", "-n").stdout.strip() == ""
