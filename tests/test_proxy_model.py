"""The shared kube-proxy model (testbed.proxy.model) that every backend renders from: Service
ports and endpoints built from API objects, endpoint categorization (upstream's
CategorizeEndpoints), and the change tracker that drives partial syncs. Pure: no root, no kernel.

IP plan: as test_proxy_iptables.py (tests/proxy_fixtures.py holds the shared objects).
"""

from __future__ import annotations

import pytest

from testbed.proxy.model import (
    ChangeTracker, Endpoint, ProxyState, ServicePort, ServicePortName, build_endpoints, build_service_ports,
    categorize_endpoints,
)
from tests.proxy_fixtures import NODE, eps, golden_objects, spn, svc

pytestmark = pytest.mark.unit


def test_service_port_name_prints_like_upstream():
    assert str(spn("ns1", "svc1")) == "ns1/svc1:p80"
    assert str(ServicePortName("ns1", "svc1", "", "TCP")) == "ns1/svc1"  # unnamed port: no colon


def test_build_service_ports():
    lb = svc("ns6", "svc6", "10.96.0.16", type="LoadBalancer", externalTrafficPolicy="Local",
             healthCheckNodePort=31999, loadBalancerSourceRanges=[" 203.0.113.0/25 "], externalIPs=["203.0.113.7"],
             sessionAffinity="ClientIP",
             ports=[{"name": "p80", "port": 80, "targetPort": "http", "nodePort": 30082},
                    {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}],
             status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}, {"hostname": "lb.example"}]}})
    tcp, udp = build_service_ports(lb)
    assert tcp == ServicePort(
        name=spn("ns6", "svc6"), cluster_ip="10.96.0.16", port=80, protocol="TCP", node_port=30082,
        external_ips=("203.0.113.7",), load_balancer_ips=("203.0.113.10",),
        load_balancer_source_ranges=("203.0.113.0/25",), external_policy_local=True, internal_policy_local=False,
        session_affinity_timeout=10800, health_check_node_port=31999, target_port="http")
    assert udp.name == spn("ns6", "svc6", "dns", "UDP") and udp.node_port == 30053
    assert build_service_ports(svc("ns", "headless", "None")) == []
    assert build_service_ports(svc("ns", "no-ip", "")) == []
    # externalTrafficPolicy means nothing on a ClusterIP Service without external IPs
    (plain,) = build_service_ports(svc("ns", "c", "10.96.0.9", externalTrafficPolicy="Local"))
    assert not plain.external_policy_local and not plain.externally_accessible


def test_build_endpoints_resolves_ports_by_name_and_protocol_and_reads_conditions():
    name = spn("ns1", "svc1", "http")
    slices = [
        eps("ns1", "svc1", [("10.244.1.5", NODE), ("10.244.2.5", "node-b", {"ready": False, "serving": True,
                                                                               "terminating": True})],
            ports=[{"name": "http", "port": 8080}, {"name": "http", "port": 9999, "protocol": "UDP"}], name="a"),
        eps("ns1", "svc1", [("10.244.1.4", NODE, {"ready": True})], ports=[{"name": "http", "port": 8081}], name="b"),
        eps("ns1", "svc1", [("10.244.1.9", NODE)], ports=[{"name": "other", "port": 1}], name="c"),
        eps("ns1", "other", [("10.244.1.8", NODE)], ports=[{"name": "http", "port": 1}], name="d"),
        eps("ns1", "svc1", [("10.244.1.5", NODE)], ports=[{"name": "http", "port": 8080}], name="dup"),
    ]
    got = build_endpoints(name, slices, NODE)
    assert [str(e) for e in got] == ["10.244.1.4:8081", "10.244.1.5:8080", "10.244.2.5:8080"]  # sorted, no dup
    assert got[1] == Endpoint("10.244.1.5", 8080, NODE, ready=True, serving=True, terminating=False, is_local=True)
    assert got[2] == Endpoint("10.244.2.5", 8080, "node-b", ready=False, serving=True, terminating=True,
                              is_local=False)


def _ep(ip: str, local: bool, ready=True, serving=True, terminating=False) -> Endpoint:
    return Endpoint(ip, 80, NODE if local else "node-b", ready, serving, terminating, local)


def test_categorize_endpoints_like_upstream():
    cluster = ServicePort(spn("a", "b"), "10.96.0.1", 80, "TCP")
    local_ext = ServicePort(spn("a", "b"), "10.96.0.1", 80, "TCP", node_port=30000, external_policy_local=True)
    local_int = ServicePort(spn("a", "b"), "10.96.0.1", 80, "TCP", internal_policy_local=True)
    r_local, r_remote = _ep("10.0.0.1", True), _ep("10.0.0.2", False)
    t_local = _ep("10.0.0.3", True, ready=False, terminating=True)
    t_remote = _ep("10.0.0.4", False, ready=False, terminating=True)
    dead = _ep("10.0.0.5", False, ready=False, serving=False, terminating=True)

    sel = categorize_endpoints(cluster, [r_local, r_remote, t_local, dead])
    assert sel == ((r_local, r_remote), (), (r_local, r_remote), True)
    # no ready endpoint left: serving terminating ones are used
    assert categorize_endpoints(cluster, [t_local, t_remote, dead]).cluster == (t_local, t_remote)
    assert categorize_endpoints(cluster, [dead]) == ((), (), (), False)

    sel = categorize_endpoints(local_ext, [r_local, r_remote])
    assert sel == ((r_local, r_remote), (r_local,), (r_local, r_remote), True)
    # local falls back to terminating local endpoints although remote ready ones exist
    sel = categorize_endpoints(local_ext, [t_local, r_remote])
    assert sel == ((r_remote,), (t_local,), (r_remote, t_local), True)
    assert categorize_endpoints(local_ext, [r_remote]).local == ()

    sel = categorize_endpoints(local_int, [r_local, r_remote])
    assert sel == ((), (r_local,), (r_local,), True)
    assert categorize_endpoints(local_int, [r_remote]) == ((), (), (), True)  # endpoints exist, none here


def test_change_tracker_reports_real_changes_only():
    tracker = ChangeTracker(NODE)
    s1, s2 = svc("ns1", "svc1", "10.96.0.11"), svc("ns2", "svc2", "10.96.0.12")
    e1 = eps("ns1", "svc1", [("10.244.1.2", NODE)])
    tracker.on_service("ADDED", None, s1)
    tracker.on_service("ADDED", None, s2)
    tracker.on_slice("ADDED", None, e1)
    assert tracker.take() == {spn("ns1", "svc1"), spn("ns2", "svc2")}
    assert tracker.state.endpoints[spn("ns1", "svc1")] == (Endpoint("10.244.1.2", 8080, NODE, is_local=True),)
    assert tracker.take() == set() and not tracker.pending

    # a resync, a status-only write and A -> B -> A are no-ops
    tracker.on_service("MODIFIED", s1, s1)
    tracker.on_slice("MODIFIED", e1, e1)
    moved = eps("ns1", "svc1", [("10.244.1.3", NODE)])
    tracker.on_slice("MODIFIED", e1, moved)
    tracker.on_slice("MODIFIED", moved, e1)
    assert tracker.pending and tracker.take() == set()

    # endpoints change; a port is renamed (old and new name change); a Service goes
    tracker.on_slice("MODIFIED", e1, moved)
    renamed = svc("ns2", "svc2", "10.96.0.12", ports=[{"name": "web", "port": 80}])
    tracker.on_service("MODIFIED", s2, renamed)
    assert tracker.take() == {spn("ns1", "svc1"), spn("ns2", "svc2"), spn("ns2", "svc2", "web")}
    assert [str(e) for e in tracker.state.endpoints[spn("ns1", "svc1")]] == ["10.244.1.3:8080"]
    tracker.on_service("DELETED", renamed, None)
    tracker.on_slice("DELETED", moved, None)
    assert tracker.take() == {spn("ns2", "svc2", "web"), spn("ns1", "svc1")}
    assert set(tracker.state.services) == {spn("ns1", "svc1")} and tracker.state.endpoints == {}


def test_state_from_objects_equals_the_tracked_state():
    objects = golden_objects()
    state = ProxyState.from_objects(*objects, NODE)
    assert state.node_name == NODE
    assert len(state.services) == 9  # the headless Service has none
    assert [str(e) for e in state.endpoints_of(spn("ns1", "svc1"))] == ["10.244.1.2:8080", "10.244.2.2:8080"]
