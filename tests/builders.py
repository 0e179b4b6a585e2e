"""Test objects written the way users write them: as Kubernetes manifests."""

from __future__ import annotations

from testbed.api.kinds import BY_NAME
from testbed.api.kube_json import from_dict
from testbed.api.meta import now_rfc3339
from testbed.api.v1 import api_pb2 as pb


def obj(manifest: dict):
    message, warnings = from_dict(manifest, BY_NAME[manifest["kind"]])
    assert not warnings, warnings
    return message


def service(name: str, ports=None, selector=None, **spec) -> pb.Service:
    return obj({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"selector": selector if selector is not None else {"app": name},
                 "ports": ports if ports is not None else [{"port": 80, "targetPort": 8080}], **spec},
    })


def deployment(name: str, replicas: int = 3, image: str = "nginx", port: int = 8080, port_name: str = "") -> pb.Deployment:
    container_port = {"containerPort": port, **({"name": port_name} if port_name else {})}
    return obj({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "web", "image": image, "ports": [container_port]}]}}},
    })


def node(name: str, ip: str) -> pb.Node:
    n = pb.Node()
    n.metadata.name = name
    n.status.addresses.add(type="InternalIP", address=ip)
    n.status.conditions.add(type="Ready", status="True", last_heartbeat_time=now_rfc3339())
    n.status.capacity["pods"] = n.status.allocatable["pods"] = "110"  # as the kubelet advertises
    return n
