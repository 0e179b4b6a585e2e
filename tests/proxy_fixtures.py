"""The fixed Service set both kube-proxy backends' tests render, written as manifests."""

from __future__ import annotations

from testbed.proxy.model import ChangeTracker, ServicePortName
from tests.builders import obj

NODE = "node-a"
CLUSTER_CIDR = "10.244.0.0/16"
NODE_IP = "172.18.0.2"


def svc(ns: str, name: str, ip: str, ports=None, **spec) -> object:
    status = spec.pop("status", {})
    return obj({
        "apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name},
        "spec": {"clusterIP": ip, "ports": ports or [{"name": "p80", "port": 80, "targetPort": 8080}], **spec},
        "status": status,
    })


def eps(ns: str, service: str, endpoints: list, ports=None, name: str | None = None) -> object:
    """endpoints: (ip, node) or (ip, node, {conditions})."""
    return obj({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name or f"{service}-abcde",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": ports or [{"name": "p80", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [e[0]], "nodeName": e[1], **({"conditions": e[2]} if len(e) > 2 else {})}
                      for e in endpoints],
    })


def spn(ns: str, name: str, port: str = "p80", protocol: str = "TCP") -> ServicePortName:
    return ServicePortName(ns, name, port, protocol)


def golden_objects():
    """The fixed set: one Service per behaviour, on node-a."""
    services = [
        svc("ns1", "svc1", "10.96.0.11"),  # ClusterIP, two endpoints
        svc("ns2", "svc2", "10.96.0.12", type="NodePort",
            ports=[{"name": "p80", "port": 80, "targetPort": 8080, "nodePort": 30082}]),
        svc("ns3", "svc3", "10.96.0.13", type="NodePort", externalTrafficPolicy="Local",  # one local, one remote
            ports=[{"name": "p80", "port": 80, "targetPort": 8080, "nodePort": 30083}]),
        svc("ns4", "svc4", "10.96.0.14"),  # no endpoints
        svc("ns5", "svc5", "10.96.0.15", sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}),
        svc("ns6", "svc6", "10.96.0.16", type="LoadBalancer", externalTrafficPolicy="Cluster",
            loadBalancerSourceRanges=["203.0.113.0/25", "172.18.0.0/16"],
            ports=[{"name": "p80", "port": 80, "targetPort": 8080, "nodePort": 30086}],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}),
        svc("ns7", "svc7", "10.96.0.17", type="NodePort", externalTrafficPolicy="Local",  # remote endpoint only
            ports=[{"name": "p80", "port": 80, "targetPort": 8080, "nodePort": 30087}]),
        svc("ns8", "svc8", "10.96.0.18", internalTrafficPolicy="Local"),  # remote endpoint only
        svc("ns9", "svc9", "10.96.0.19", externalIPs=["203.0.113.9"]),
        svc("ns0", "headless", "None"),
    ]
    slices = [
        eps("ns1", "svc1", [("10.244.1.2", NODE), ("10.244.2.2", "node-b")]),
        eps("ns2", "svc2", [("10.244.1.3", NODE)]),
        eps("ns3", "svc3", [("10.244.1.4", NODE), ("10.244.2.4", "node-b")]),
        eps("ns4", "svc4", []),
        eps("ns5", "svc5", [("10.244.1.6", NODE), ("10.244.2.6", "node-b")]),
        eps("ns6", "svc6", [("10.244.2.7", "node-b")]),
        eps("ns7", "svc7", [("10.244.2.8", "node-b")]),
        eps("ns8", "svc8", [("10.244.2.9", "node-b")]),
        eps("ns9", "svc9", [("10.244.1.10", NODE)]),
        eps("ns0", "headless", [("10.244.1.11", NODE)]),
    ]
    return services, slices


def tracked(services, slices) -> ChangeTracker:
    """A ChangeTracker of this node that has seen and applied the objects."""
    return ChangeTracker.from_objects(services, slices, NODE)
