"""ClusterIP and NodePort allocation: requested, dynamic, taken, out of range, exhausted, released, kept."""

from __future__ import annotations

import ipaddress

import pytest

from testbed.api.errors import ApiError, RangeFull
from tests.builders import service
from tests.conftest import REPO, run
from testbed.manifests import load_paths

pytestmark = pytest.mark.unit

SEED = str(REPO / "scenarios/manifests/seed")


def test_cluster_ips_come_from_the_cidr_and_requests_are_honoured(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            ips = set()
            for i in range(50):
                svc = await c.create(service(f"s{i}"))
                ip = ipaddress.ip_address(svc.spec.cluster_ip)
                assert ip in ipaddress.ip_network("10.96.0.0/12")
                assert list(svc.spec.cluster_ips) == [svc.spec.cluster_ip]
                ips.add(ip)
            assert len(ips) == 50
            # dynamic ones stay out of the low band kept for requested addresses (KEP-3070)
            assert all(int(ip) - int(ipaddress.ip_address("10.96.0.0")) > 256 for ip in ips)
            dns = await c.create(service("kube-dns", clusterIP="10.96.0.10"))
            assert dns.spec.cluster_ip == "10.96.0.10"
            with pytest.raises(ApiError, match=r'spec.clusterIPs: Invalid value: \["10.96.0.10"\]: failed to allocate IP 10.96.0.10: provided IP is already allocated'):
                await c.create(service("again", clusterIP="10.96.0.10"))
            with pytest.raises(ApiError, match="is not in the valid range. The range of valid IPs is 10.96.0.0/12"):
                await c.create(service("outside", clusterIP="10.200.0.1"))
            headless = await c.create(service("headless", clusterIP="None"))
            assert headless.spec.cluster_ip == "None"
    run(scenario())


def test_cluster_ip_exhaustion_and_reuse(make_apiserver):
    server = make_apiserver("--service-cidr", "10.96.0.0/29")  # 6 usable, .1 is the kubernetes Service

    async def scenario():
        async with server.client() as c:
            created = [await c.create(service(f"s{i}")) for i in range(5)]
            with pytest.raises(RangeFull, match="failed to allocate a serviceIP: range is full"):
                await c.create(service("one-too-many"))
            freed = created[2].spec.cluster_ip
            await c.delete("Service", "s2")
            again = await c.create(service("reuse"))
            assert again.spec.cluster_ip == freed
    run(scenario())


def test_node_ports_requested_taken_dynamic_and_released(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            a = await c.create(service("a", type="NodePort", ports=[{"port": 80, "nodePort": 30007}]))
            assert a.spec.ports[0].node_port == 30007
            with pytest.raises(ApiError, match=r"spec.ports\[0\].nodePort: Invalid value: 30007: provided port is already allocated"):
                await c.create(service("b", type="NodePort", ports=[{"port": 80, "nodePort": 30007}]))
            b = await c.create(service("b", type="NodePort"))
            assert 30000 <= b.spec.ports[0].node_port <= 32767 and b.spec.ports[0].node_port != 30007
            await c.delete("Service", "a")
            again = await c.create(service("c", type="NodePort", ports=[{"port": 80, "nodePort": 30007}]))
            assert again.spec.ports[0].node_port == 30007
    run(scenario())


def test_node_port_exhaustion(make_apiserver):
    server = make_apiserver("--node-port-range", "30000-30002")

    async def scenario():
        async with server.client() as c:
            await c.create(service("a", type="NodePort", ports=[{"name": "x", "port": 80}, {"name": "y", "port": 81}]))
            await c.create(service("b", type="NodePort"))
            with pytest.raises(RangeFull, match="failed to allocate a nodePort: range is full"):
                await c.create(service("c", type="NodePort"))
            # the refused Service took nothing: its ClusterIP went back too
            items, _ = await c.list("Service")
            assert sorted(s.metadata.name for s in items) == ["a", "b", "kubernetes"]
    run(scenario())


def test_allocations_kept_across_updates_that_omit_them(apiserver):
    """The seed article's sequence: ClusterIP, then NodePort 30007, then LoadBalancer without nodePort."""
    def seed(name):
        return load_paths([f"{SEED}/{name}"]).objects[0]

    async def scenario():
        async with apiserver.client() as c:
            first = await c.create(seed("service-clusterip.yaml"))
            second = await c.update(seed("service-nodeport.yaml"))
            assert second.spec.cluster_ip == first.spec.cluster_ip
            assert second.spec.ports[0].node_port == 30007
            third = await c.update(seed("service-loadbalancer.yaml"))
            assert third.spec.type == "LoadBalancer"
            assert third.spec.cluster_ip == first.spec.cluster_ip
            assert third.spec.ports[0].node_port == 30007
            back = await c.update(seed("service-clusterip.yaml"))
            assert back.spec.ports[0].node_port == 0
            # 30007 was released when the Service stopped needing it
            other = await c.create(service("other", type="NodePort", ports=[{"port": 80, "nodePort": 30007}]))
            assert other.spec.ports[0].node_port == 30007
            with pytest.raises(ApiError, match=r"spec.clusterIPs\[0\]: Invalid value: \"10.96.0.99\": may not change once set"):
                await c.update(seed("service-clusterip.yaml").__class__.FromString(
                    service("frontend-service", clusterIP="10.96.0.99", selector={"app": "frontend"}).SerializeToString()))
    run(scenario())


def test_health_check_node_port_for_local_load_balancers(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            svc = await c.create(service("lb", type="LoadBalancer", externalTrafficPolicy="Local"))
            hc = svc.spec.health_check_node_port
            assert 30000 <= hc <= 32767 and hc != svc.spec.ports[0].node_port
            kept = await c.update(service("lb", type="LoadBalancer", externalTrafficPolicy="Local"))
            assert kept.spec.health_check_node_port == hc
            cluster = await c.update(service("lb", type="LoadBalancer", externalTrafficPolicy="Cluster"))
            assert cluster.spec.health_check_node_port == 0
            reuse = await c.create(service("x", type="NodePort", ports=[{"port": 80, "nodePort": hc}]))
            assert reuse.spec.ports[0].node_port == hc
    run(scenario())
