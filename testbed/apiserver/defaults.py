"""Defaulting, as the Kubernetes API server fills in omitted fields before validation."""

from __future__ import annotations

from google.protobuf.message import Message

from testbed.api.v1 import api_pb2 as pb

DEFAULT_AFFINITY_TIMEOUT = 10800
DEFAULT_TERMINATION_GRACE = 30


def default_pod_spec(spec: pb.PodSpec) -> None:
    for container in spec.containers:
        for port in container.ports:
            port.protocol = port.protocol or "TCP"
        probe = container.readiness_probe
        if probe.HasField("tcp_socket") or probe.HasField("http_get"):
            probe.period_seconds = probe.period_seconds or 10
            probe.timeout_seconds = probe.timeout_seconds or 1
            probe.success_threshold = probe.success_threshold or 1
            probe.failure_threshold = probe.failure_threshold or 3
            if probe.HasField("http_get"):
                probe.http_get.path = probe.http_get.path or "/"
    if not spec.HasField("termination_grace_period_seconds"):
        spec.termination_grace_period_seconds = DEFAULT_TERMINATION_GRACE
    spec.restart_policy = spec.restart_policy or "Always"


def default_service(svc: pb.Service) -> None:
    spec = svc.spec
    spec.type = spec.type or "ClusterIP"
    for port in spec.ports:
        port.protocol = port.protocol or "TCP"
        if port.target_port.WhichOneof("value") is None:
            port.target_port.int_val = port.port
    spec.session_affinity = spec.session_affinity or "None"
    if spec.session_affinity == "ClientIP" and not spec.session_affinity_config.client_ip.HasField("timeout_seconds"):
        spec.session_affinity_config.client_ip.timeout_seconds = DEFAULT_AFFINITY_TIMEOUT
    spec.internal_traffic_policy = spec.internal_traffic_policy or "Cluster"
    if spec.type in ("NodePort", "LoadBalancer"):
        spec.external_traffic_policy = spec.external_traffic_policy or "Cluster"


def default_pod(pod: pb.Pod) -> None:
    default_pod_spec(pod.spec)
    pod.status.phase = pod.status.phase or "Pending"


def default_deployment(deploy: pb.Deployment) -> None:
    spec = deploy.spec
    if not spec.HasField("replicas"):
        spec.replicas = 1
    spec.strategy.type = spec.strategy.type or "RollingUpdate"
    if spec.strategy.type == "RollingUpdate":
        rolling = spec.strategy.rolling_update
        if rolling.max_surge.WhichOneof("value") is None:
            rolling.max_surge.str_val = "25%"
        if rolling.max_unavailable.WhichOneof("value") is None:
            rolling.max_unavailable.str_val = "25%"
    default_pod_spec(spec.template.spec)


def default_endpoint_slice(eps: pb.EndpointSlice) -> None:
    eps.address_type = eps.address_type or "IPv4"
    for port in eps.ports:
        port.protocol = port.protocol or "TCP"


DEFAULTERS = {
    "Service": default_service,
    "Pod": default_pod,
    "Deployment": default_deployment,
    "EndpointSlice": default_endpoint_slice,
    "Node": lambda node: None,
}


def apply_defaults(kind: str, obj: Message) -> None:
    DEFAULTERS[kind](obj)
