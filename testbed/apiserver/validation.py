"""Field validation per kind, with Kubernetes' rules and wording.

Each validator returns every problem it finds as a FieldError; the caller
refuses the write if the list is not empty, so the store never changes.
"""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal

from google.protobuf.message import Message

from testbed.api import quantity
from testbed.api.kube_json import int_or_string
from testbed.api.selectors import SelectorError, label_selector_requirements, labels_match
from testbed.api.v1 import api_pb2 as pb
from testbed.api.errors import FieldError, duplicate, forbidden, invalid, required, too_long, unsupported

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")

PROTOCOLS = ("SCTP", "TCP", "UDP")
SERVICE_TYPES = ("ClusterIP", "LoadBalancer", "NodePort")
TRAFFIC_POLICIES = ("Cluster", "Local")
AFFINITIES = ("ClientIP", "None")
MAX_AFFINITY_TIMEOUT = 86400
STANDARD_CONTAINER_RESOURCES = ("cpu", "memory", "ephemeral-storage")
TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024  # bytes of keys and values together, as Kubernetes


def dns1035_label(path: str, value: str) -> list[FieldError]:
    if len(value) > 63 or not _DNS1035_LABEL.match(value):
        return [
            invalid(
                path,
                value,
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
                "regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')",
            )
        ]
    return []


def dns1123_label(path: str, value: str) -> list[FieldError]:
    if len(value) > 63 or not _DNS1123_LABEL.match(value):
        return [
            invalid(
                path,
                value,
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
                "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
                "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
            )
        ]
    return []


def dns1123_subdomain(path: str, value: str) -> list[FieldError]:
    if len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
        return [
            invalid(
                path,
                value,
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
            )
        ]
    return []


def port_number(path: str, value: int) -> list[FieldError]:
    if not 1 <= value <= 65535:
        return [invalid(path, value, "must be between 1 and 65535, inclusive")]
    return []


def port_name(path: str, value: str) -> list[FieldError]:
    if len(value) > 15 or not _IANA_SVC_NAME.match(value) or "--" in value or not re.search("[a-z]", value):
        return [invalid(path, value, "must be no more than 15 characters, contain only lowercase alphanumeric "
                                     "characters or '-', contain at least one letter, and not start or end with "
                                     "'-' or contain '--'")]
    return []


def protocol(path: str, value: str) -> list[FieldError]:
    return [] if value in PROTOCOLS else [unsupported(path, value, PROTOCOLS)]


def int_or_name_port(path: str, value: pb.IntOrString) -> list[FieldError]:
    v = int_or_string(value)
    if v is None:
        return [required(path)]
    return port_number(path, v) if isinstance(v, int) else port_name(path, v)


_IPV4 = re.compile(r"^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$")


def ip_address(path: str, value: str) -> list[FieldError]:
    # A regex, not ipaddress: this runs for every endpoint of every slice written.
    if not _IPV4.match(value):
        return [invalid(path, value, "must be a valid IP address, (e.g. 10.9.8.7)")]
    return []


def endpoint_ip(path: str, value: str) -> list[FieldError]:
    """An address traffic is sent to (Kubernetes' ValidateEndpointIP): not unspecified, loopback or
    link-local, which would make every node DNAT to itself. Global multicast passes, as upstream."""
    errs = ip_address(path, value)
    if errs:
        return errs
    a, b, c, _ = value.split(".")
    if value == "0.0.0.0":
        errs.append(invalid(path, value, f"may not be unspecified ({value})"))
    if a == "127":
        errs.append(invalid(path, value, "may not be in the loopback range (127.0.0.0/8, ::1/128)"))
    if (a, b) == ("169", "254"):
        errs.append(invalid(path, value, "may not be in the link-local range (169.254.0.0/16, fe80::/10)"))
    if (a, b, c) == ("224", "0", "0"):
        errs.append(invalid(path, value, "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"))
    return errs


def labels(path: str, values: dict[str, str]) -> list[FieldError]:
    errs = []
    for key, value in values.items():
        name = key.split("/")[-1]
        if len(name) > 63 or not _LABEL_NAME.match(name):
            errs.append(invalid(path, key, "name part must consist of alphanumeric characters, '-', '_' or '.'"))
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            errs.append(invalid(f"{path}", value, "a valid label must be an empty string or consist of "
                                                  "alphanumeric characters, '-', '_' or '.'"))
    return errs


def annotations(path: str, values: dict[str, str]) -> list[FieldError]:
    total = sum(len(k.encode()) + len(v.encode()) for k, v in values.items())
    return [too_long(path, TOTAL_ANNOTATION_SIZE_LIMIT)] if total > TOTAL_ANNOTATION_SIZE_LIMIT else []


def metadata(meta: pb.ObjectMeta, namespaced: bool, name_rule=dns1123_subdomain) -> list[FieldError]:
    errs = []
    if not meta.name:
        errs.append(required("metadata.name", "name or generateName is required"))
    else:
        errs += name_rule("metadata.name", meta.name)
    if namespaced:
        errs += dns1123_label("metadata.namespace", meta.namespace)
    errs += labels("metadata.labels", dict(meta.labels))
    errs += annotations("metadata.annotations", dict(meta.annotations))
    return errs


# ---------------------------------------------------------------- per kind


def validate_service(svc: pb.Service) -> list[FieldError]:
    errs = metadata(svc.metadata, True, dns1035_label)
    spec = svc.spec
    errs += _service_type_and_ip(spec)
    errs += _service_ports(spec)
    errs += _service_policies(spec)
    errs += _service_external_addresses(spec)
    return errs


def _service_type_and_ip(spec: pb.ServiceSpec) -> list[FieldError]:
    errs = []
    if spec.type not in SERVICE_TYPES:
        errs.append(unsupported("spec.type", spec.type, SERVICE_TYPES))
    headless = spec.cluster_ip == "None"
    if headless and spec.type != "ClusterIP":
        errs.append(invalid("spec.clusterIPs[0]", "None", f"may not be set to 'None' for {spec.type} services"))
    if spec.cluster_ip and not headless:
        errs += ip_address("spec.clusterIPs[0]", spec.cluster_ip)
    if not spec.ports and not headless:
        errs.append(required("spec.ports"))
    return errs


def _service_ports(spec: pb.ServiceSpec) -> list[FieldError]:
    errs = []
    names: set[str] = set()
    port_protocols: set[tuple[int, str]] = set()
    for i, port in enumerate(spec.ports):
        path = f"spec.ports[{i}]"
        if len(spec.ports) > 1 and not port.name:
            errs.append(required(f"{path}.name"))
        elif port.name:
            errs += dns1123_label(f"{path}.name", port.name)
            if port.name in names:
                errs.append(duplicate(f"{path}.name", port.name))
            names.add(port.name)
        errs += protocol(f"{path}.protocol", port.protocol)
        errs += port_number(f"{path}.port", port.port)
        errs += int_or_name_port(f"{path}.targetPort", port.target_port)
        if (port.port, port.protocol) in port_protocols:
            errs.append(duplicate(path, {"port": port.port, "protocol": port.protocol}))
        port_protocols.add((port.port, port.protocol))
        if port.node_port and spec.type == "ClusterIP":
            errs.append(forbidden(f"{path}.nodePort", "may not be used when `type` is 'ClusterIP'"))
        elif port.node_port:
            errs += port_number(f"{path}.nodePort", port.node_port)
    return errs


def _service_policies(spec: pb.ServiceSpec) -> list[FieldError]:
    """Traffic policies and session affinity."""
    errs = []
    external = spec.type in ("NodePort", "LoadBalancer")
    if spec.external_traffic_policy:
        if not external:
            errs.append(invalid("spec.externalTrafficPolicy", spec.external_traffic_policy,
                                "may only be set for externally-accessible services"))
        elif spec.external_traffic_policy not in TRAFFIC_POLICIES:
            errs.append(unsupported("spec.externalTrafficPolicy", spec.external_traffic_policy, TRAFFIC_POLICIES))
    if spec.internal_traffic_policy not in TRAFFIC_POLICIES:
        errs.append(unsupported("spec.internalTrafficPolicy", spec.internal_traffic_policy, TRAFFIC_POLICIES))
    if spec.session_affinity not in AFFINITIES:
        errs.append(unsupported("spec.sessionAffinity", spec.session_affinity, AFFINITIES))
    timeout_set = spec.session_affinity_config.client_ip.HasField("timeout_seconds")
    if spec.session_affinity == "ClientIP":
        timeout = spec.session_affinity_config.client_ip.timeout_seconds
        if timeout_set and not 0 < timeout <= MAX_AFFINITY_TIMEOUT:
            errs.append(invalid("spec.sessionAffinityConfig.clientIP.timeoutSeconds", timeout,
                                f"must be greater than 0 and less than {MAX_AFFINITY_TIMEOUT}"))
    elif timeout_set:
        errs.append(forbidden("spec.sessionAffinityConfig", "must not be set when session affinity is None"))
    return errs


def _service_external_addresses(spec: pb.ServiceSpec) -> list[FieldError]:
    """Source ranges, external and LoadBalancer IPs, the health-check node port."""
    errs = []
    for i, cidr in enumerate(spec.load_balancer_source_ranges):
        try:  # space-padded values pass, as upstream (a relic of the annotation): consumers trim them
            ipaddress.IPv4Network(cidr.strip(), strict=False)
        except ValueError:
            errs.append(invalid(f"spec.loadBalancerSourceRanges[{i}]", cidr,
                                "must be a list of IP ranges. For example, 10.240.0.0/24,10.250.0.0/24 "))
    if spec.load_balancer_source_ranges and spec.type != "LoadBalancer":
        errs.append(forbidden("spec.loadBalancerSourceRanges", "may only be used when `type` is 'LoadBalancer'"))
    for i, ip in enumerate(spec.external_ips):
        errs += ip_address(f"spec.externalIPs[{i}]", ip)
    if spec.load_balancer_ip:
        errs += ip_address("spec.loadBalancerIP", spec.load_balancer_ip)
    if spec.health_check_node_port and not (
        spec.type == "LoadBalancer" and spec.external_traffic_policy == "Local"
    ):
        errs.append(invalid("spec.healthCheckNodePort", spec.health_check_node_port,
                            "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"))
    return errs


RESTART_POLICIES = ("Always", "OnFailure", "Never")


def validate_pod_spec(spec: pb.PodSpec, path: str) -> list[FieldError]:
    errs = []
    if not spec.containers:
        errs.append(required(f"{path}.containers"))
    names: set[str] = set()
    for i, c in enumerate(spec.containers):
        cpath = f"{path}.containers[{i}]"
        if not c.name:
            errs.append(required(f"{cpath}.name"))
        else:
            errs += dns1123_label(f"{cpath}.name", c.name)
            if c.name in names:
                errs.append(duplicate(f"{cpath}.name", c.name))
            names.add(c.name)
        if not c.image:
            errs.append(required(f"{cpath}.image"))
        port_names: set[str] = set()
        for j, p in enumerate(c.ports):
            ppath = f"{cpath}.ports[{j}]"
            errs += port_number(f"{ppath}.containerPort", p.container_port)
            errs += protocol(f"{ppath}.protocol", p.protocol)
            if p.name:
                errs += port_name(f"{ppath}.name", p.name)
                if p.name in port_names:
                    errs.append(duplicate(f"{ppath}.name", p.name))
                port_names.add(p.name)
        probe = c.readiness_probe
        if probe.HasField("tcp_socket"):
            errs += int_or_name_port(f"{cpath}.readinessProbe.tcpSocket.port", probe.tcp_socket.port)
        if probe.HasField("http_get"):
            errs += int_or_name_port(f"{cpath}.readinessProbe.httpGet.port", probe.http_get.port)
        errs += resource_requirements(f"{cpath}.resources", c.resources)
        sleep = c.lifecycle.pre_stop.sleep
        if c.lifecycle.pre_stop.HasField("sleep") and sleep.seconds < 0:
            errs.append(invalid(f"{cpath}.lifecycle.preStop.sleep.seconds", sleep.seconds,
                                "must be greater than or equal to 0"))
    if spec.HasField("termination_grace_period_seconds") and spec.termination_grace_period_seconds < 0:
        errs.append(invalid(f"{path}.terminationGracePeriodSeconds", spec.termination_grace_period_seconds,
                            "must be greater than or equal to 0"))
    if spec.restart_policy not in RESTART_POLICIES:
        errs.append(unsupported(f"{path}.restartPolicy", spec.restart_policy, RESTART_POLICIES))
    return errs


def _resource_name(path: str, name: str) -> list[FieldError]:
    if "/" in name or name in STANDARD_CONTAINER_RESOURCES or name.startswith("hugepages-"):
        return []
    return [invalid(path, name, "must be a standard resource for containers")]


def _quantities(path: str, values: dict[str, str]) -> tuple[dict[str, Decimal], list[FieldError]]:
    parsed, errs = {}, []
    for name, text in sorted(values.items()):
        key_path = f"{path}[{name}]"
        errs += _resource_name(key_path, name)
        try:
            parsed[name] = quantity.parse(text)
        except quantity.QuantityError as exc:
            errs.append(invalid(key_path, text, str(exc)))
            continue
        if parsed[name] < 0:
            errs.append(invalid(key_path, text, "must be greater than or equal to 0"))
    return parsed, errs


def resource_requirements(path: str, resources: pb.ResourceRequirements) -> list[FieldError]:
    """Kubernetes' ValidateResourceRequirements: known names, quantities, requests <= limits
    (equal for extended resources, which cannot be overcommitted)."""
    limits, errs = _quantities(f"{path}.limits", dict(resources.limits))
    requests, request_errs = _quantities(f"{path}.requests", dict(resources.requests))
    errs += request_errs
    for name, request in requests.items():
        if name not in limits:
            continue
        limit_text = resources.limits[name]
        if "/" in name and request != limits[name]:
            errs.append(invalid(f"{path}.requests", resources.requests[name],
                                f"must be equal to {name} limit of {limit_text}"))
        elif request > limits[name]:
            errs.append(invalid(f"{path}.requests", resources.requests[name],
                                f"must be less than or equal to {name} limit of {limit_text}"))
    return errs


def validate_pod(pod: pb.Pod) -> list[FieldError]:
    return metadata(pod.metadata, True) + validate_pod_spec(pod.spec, "spec")


def validate_deployment(deploy: pb.Deployment) -> list[FieldError]:
    errs = metadata(deploy.metadata, True)
    spec = deploy.spec
    if spec.replicas < 0:
        errs.append(invalid("spec.replicas", spec.replicas, "must be greater than or equal to 0"))
    if not spec.selector.match_labels and not spec.selector.match_expressions:
        errs.append(required("spec.selector"))
    else:
        try:
            reqs = label_selector_requirements(spec.selector)
            if not labels_match(reqs, spec.template.metadata.labels):
                errs.append(invalid("spec.template.metadata.labels", dict(spec.template.metadata.labels),
                                    "`selector` does not match template `labels`"))
        except SelectorError as exc:
            errs.append(invalid("spec.selector", "", str(exc)))
    errs += labels("spec.template.metadata.labels", dict(spec.template.metadata.labels))
    errs += annotations("spec.template.annotations", dict(spec.template.metadata.annotations))
    errs += validate_pod_spec(spec.template.spec, "spec.template.spec")
    if spec.template.spec.restart_policy in RESTART_POLICIES and spec.template.spec.restart_policy != "Always":
        errs.append(unsupported("spec.template.spec.restartPolicy", spec.template.spec.restart_policy, ("Always",)))
    if spec.strategy.type not in ("RollingUpdate", "Recreate"):
        errs.append(unsupported("spec.strategy.type", spec.strategy.type, ("Recreate", "RollingUpdate")))
    return errs


def validate_node(node: pb.Node) -> list[FieldError]:
    errs = metadata(node.metadata, False)
    for i, addr in enumerate(node.status.addresses):
        if addr.type == "InternalIP":
            errs += ip_address(f"status.addresses[{i}].address", addr.address)
    return errs


def validate_endpoint_slice(eps: pb.EndpointSlice) -> list[FieldError]:
    errs = metadata(eps.metadata, True)
    if eps.address_type != "IPv4":
        errs.append(unsupported("addressType", eps.address_type, ("IPv4",)))
    for i, ep in enumerate(eps.endpoints):
        if not ep.addresses:
            errs.append(required(f"endpoints[{i}].addresses"))
        for j, addr in enumerate(ep.addresses):
            errs += endpoint_ip(f"endpoints[{i}].addresses[{j}]", addr)
        if ep.node_name:
            errs += dns1123_subdomain(f"endpoints[{i}].nodeName", ep.node_name)
    names: set[str] = set()
    for i, port in enumerate(eps.ports):
        if port.name in names:
            errs.append(duplicate(f"ports[{i}].name", port.name))
        names.add(port.name)
        if port.name:
            errs += dns1123_label(f"ports[{i}].name", port.name)
        errs += protocol(f"ports[{i}].protocol", port.protocol)
        if port.HasField("port"):
            errs += port_number(f"ports[{i}].port", port.port)
    return errs


VALIDATORS = {
    "Service": validate_service,
    "Pod": validate_pod,
    "Deployment": validate_deployment,
    "Node": validate_node,
    "EndpointSlice": validate_endpoint_slice,
}


def validate(kind: str, obj: Message) -> list[FieldError]:
    return VALIDATORS[kind](obj)
