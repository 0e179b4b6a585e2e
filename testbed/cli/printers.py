"""kubectl-shaped output: tables for `get`, JSON/YAML documents, `describe` text."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Callable

import yaml
from google.protobuf.message import Message

from testbed.api.kinds import Kind, kind_of
from testbed.api.kube_json import int_or_string, to_dict
from testbed.api.selectors import label_selector_requirements
from testbed.api.v1 import api_pb2 as pb

# kubectl prints "<kind>.<group>/<name>" for objects outside the core group.
RESOURCE_PREFIX = {
    "Node": "node",
    "Pod": "pod",
    "Service": "service",
    "Deployment": "deployment.apps",
    "EndpointSlice": "endpointslice.discovery.k8s.io",
}


def resource_name(obj: Message) -> str:
    return f"{RESOURCE_PREFIX[kind_of(obj).name]}/{obj.metadata.name}"


def age(timestamp: str, now: datetime | None = None) -> str:
    """kubectl's HumanDuration: 45s, 3m12s, 25m, 5h3m, 30h, 3d4h, 20d."""
    if not timestamp:
        return "<unknown>"
    then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    seconds = int(((now or datetime.now(timezone.utc)) - then).total_seconds())
    seconds = max(seconds, 0)
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d"


def condition(conditions, type_: str) -> pb.Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def node_internal_ip(node: pb.Node) -> str:
    return next((a.address for a in node.status.addresses if a.type == "InternalIP"), "")


def selector_text(selector) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "<none>"


# ---------------------------------------------------------------- tables

Column = tuple[str, Callable[[Message], str]]


def _service_ports(svc: pb.Service) -> str:
    parts = []
    for p in svc.spec.ports:
        parts.append(f"{p.port}:{p.node_port}/{p.protocol}" if p.node_port else f"{p.port}/{p.protocol}")
    return ",".join(parts) or "<none>"


def service_external_ip(svc: pb.Service) -> str:
    ips = list(svc.spec.external_ips)
    if svc.spec.type == "LoadBalancer":
        ingress = [i.ip or i.hostname for i in svc.status.load_balancer.ingress]
        return ",".join(ingress + ips) if ingress else "<pending>"
    return ",".join(ips) or "<none>"


def pod_status(pod: pb.Pod) -> str:
    if pod.metadata.deletion_timestamp:
        return "Terminating"
    if pod.status.reason:
        return pod.status.reason
    if pod.spec.node_name and pod.status.phase in ("", "Pending"):
        return "ContainerCreating"  # bound, its sandbox not up yet (kubectl shows the container's waiting reason)
    waiting = next((c.state.waiting.reason for c in pod.status.container_statuses if c.state.waiting.reason), "")
    if pod.status.phase == "Running" and waiting:
        return waiting  # CrashLoopBackOff, as kubectl shows a container waiting to restart
    return pod.status.phase or "Pending"


def pod_ready(pod: pb.Pod) -> str:
    total = len(pod.spec.containers)
    ready = condition(pod.status.conditions, "Ready")
    return f"{total if ready is not None and ready.status == 'True' else 0}/{total}"


def node_status(node: pb.Node) -> str:
    ready = condition(node.status.conditions, "Ready")
    text = "Ready" if ready is not None and ready.status == "True" else "NotReady"
    return text + (",SchedulingDisabled" if node.spec.unschedulable else "")


def _deploy_selector(d: pb.Deployment) -> str:
    return ",".join(
        f"{r.key}={r.values[0]}" if r.operator == "=" else f"{r.key} {r.operator} ({','.join(r.values)})"
        for r in label_selector_requirements(d.spec.selector)
    )


def _slice_ports(eps: pb.EndpointSlice) -> str:
    return ",".join(str(p.port) for p in eps.ports if p.HasField("port")) or "<unset>"


def _slice_endpoints(eps: pb.EndpointSlice) -> str:
    addresses = [a for e in eps.endpoints for a in e.addresses]
    if not addresses:
        return "<unset>"
    shown = ",".join(addresses[:3])
    return shown + (f" + {len(addresses) - 3} more..." if len(addresses) > 3 else "")


COLUMNS: dict[str, list[Column]] = {
    "Service": [
        ("TYPE", lambda s: s.spec.type),
        ("CLUSTER-IP", lambda s: s.spec.cluster_ip or "<none>"),
        ("EXTERNAL-IP", service_external_ip),
        ("PORT(S)", _service_ports),
    ],
    "Pod": [
        ("READY", pod_ready),
        ("STATUS", pod_status),
        ("RESTARTS", lambda p: str(sum(c.restart_count for c in p.status.container_statuses))),
    ],
    "Deployment": [
        ("READY", lambda d: f"{d.status.ready_replicas}/{d.spec.replicas}"),
        ("UP-TO-DATE", lambda d: str(d.status.updated_replicas)),
        ("AVAILABLE", lambda d: str(d.status.available_replicas)),
    ],
    "Node": [
        ("STATUS", node_status),
        ("ROLES", lambda n: "<none>"),
    ],
    "EndpointSlice": [
        ("ADDRESSTYPE", lambda e: e.address_type),
        ("PORTS", _slice_ports),
        ("ENDPOINTS", _slice_endpoints),
    ],
}

WIDE_COLUMNS: dict[str, list[Column]] = {
    "Service": [("SELECTOR", lambda s: selector_text(s.spec.selector))],
    "Pod": [("IP", lambda p: p.status.pod_ip or "<none>"), ("NODE", lambda p: p.spec.node_name or "<none>")],
    "Deployment": [
        ("CONTAINERS", lambda d: ",".join(c.name for c in d.spec.template.spec.containers)),
        ("IMAGES", lambda d: ",".join(c.image for c in d.spec.template.spec.containers)),
        ("SELECTOR", _deploy_selector),
    ],
    "Node": [("INTERNAL-IP", lambda n: node_internal_ip(n) or "<none>"), ("POD-CIDR", lambda n: n.spec.pod_cidr or "<none>")],
    "EndpointSlice": [],
}

VERSION_COLUMN: dict[str, list[Column]] = {"Node": [("VERSION", lambda n: "svclab")]}


def table(kind: Kind, objects: list[Message], wide: bool, all_namespaces: bool) -> str:
    columns: list[Column] = [("NAME", lambda o: o.metadata.name)]
    if all_namespaces and kind.namespaced:
        columns.insert(0, ("NAMESPACE", lambda o: o.metadata.namespace))
    columns += COLUMNS[kind.name]
    columns.append(("AGE", lambda o: age(o.metadata.creation_timestamp)))
    columns += VERSION_COLUMN.get(kind.name, [])
    if wide:
        columns += WIDE_COLUMNS[kind.name]
    rows = [[header for header, _ in columns]] + [[fn(o) for _, fn in columns] for o in objects]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def as_list_document(objects: list[Message], resource_version: str = "") -> dict:
    return {
        "apiVersion": "v1",
        "items": [to_dict(o) for o in objects],
        "kind": "List",
        "metadata": {"resourceVersion": resource_version},
    }


def dump(document: dict, output: str) -> str:
    if output == "json":
        return json.dumps(document, indent=4)
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False).rstrip("\n")


# ---------------------------------------------------------------- describe


def _map_lines(title: str, values: dict[str, str]) -> list[str]:
    if not values:
        return [f"{title}<none>"]
    items = [f"{k}={v}" for k, v in sorted(values.items())]
    return [f"{title}{items[0]}"] + [" " * len(title) + item for item in items[1:]]


def _meta_lines(obj: Message) -> list[str]:
    meta = obj.metadata
    lines = [f"Name:              {meta.name}"]
    if meta.namespace:
        lines.append(f"Namespace:         {meta.namespace}")
    lines += _map_lines("Labels:            ", dict(meta.labels))
    lines += _map_lines("Annotations:       ", dict(meta.annotations))
    lines.append(f"CreationTimestamp: {meta.creation_timestamp}")
    return lines


def _conditions(conditions) -> list[str]:
    if not conditions:
        return []
    width = max(7, *(len(c.type) for c in conditions))
    reason_width = max(9, *(len(c.reason) for c in conditions))
    lines = ["Conditions:", f"  {'Type':<{width}} Status  {'Reason':<{reason_width}} Message"]
    for c in conditions:
        lines.append(f"  {c.type:<{width}} {c.status:<7} {c.reason or '-':<{reason_width}} {c.message}")
    return lines


def describe(obj: Message, related: dict[str, list[Message]]) -> str:
    kind = kind_of(obj).name
    lines = _meta_lines(obj)
    if kind == "Service":
        lines += _describe_service(obj, related.get("EndpointSlice", []))
    elif kind == "Pod":
        lines += _describe_pod(obj)
    elif kind == "Deployment":
        lines += _describe_deployment(obj, related.get("Pod", []))
    elif kind == "Node":
        lines += _describe_node(obj, related.get("Pod", []))
    else:
        lines += _describe_slice(obj)
    return "\n".join(lines)


def _describe_service(svc: pb.Service, slices: list[pb.EndpointSlice]) -> list[str]:
    spec = svc.spec
    lines = _map_lines("Selector:          ", dict(spec.selector))
    lines += [
        f"Type:              {spec.type}",
        f"IP:                {spec.cluster_ip}",
        f"IPs:               {','.join(spec.cluster_ips)}",
    ]
    if spec.external_ips:
        lines.append(f"External IPs:      {','.join(spec.external_ips)}")
    if spec.load_balancer_ip:
        lines.append(f"IP Requested:      {spec.load_balancer_ip}")
    for ingress in svc.status.load_balancer.ingress:
        lines.append(f"LoadBalancer Ingress: {ingress.ip or ingress.hostname}")
    for port in spec.ports:
        name = port.name or "<unset>"
        target = int_or_string(port.target_port)
        lines.append(f"Port:              {name}  {port.port}/{port.protocol}")
        lines.append(f"TargetPort:        {target}/{port.protocol}")
        if port.node_port:
            lines.append(f"NodePort:          {name}  {port.node_port}/{port.protocol}")
        endpoints = _endpoints_for_port(slices, port.name)
        lines.append(f"Endpoints:         {endpoints}")
    lines.append(f"Session Affinity:  {spec.session_affinity}")
    if spec.session_affinity == "ClientIP":
        lines.append(f"Affinity Timeout:  {spec.session_affinity_config.client_ip.timeout_seconds}s")
    if spec.external_traffic_policy:
        lines.append(f"External Traffic Policy:  {spec.external_traffic_policy}")
    lines.append(f"Internal Traffic Policy:  {spec.internal_traffic_policy}")
    if spec.health_check_node_port:
        lines.append(f"HealthCheck NodePort:     {spec.health_check_node_port}")
    if spec.load_balancer_source_ranges:
        lines.append(f"LoadBalancer Source Ranges: {','.join(spec.load_balancer_source_ranges)}")
    lines += _conditions(svc.status.conditions)
    return lines


def _endpoints_for_port(slices: list[pb.EndpointSlice], port_name: str) -> str:
    out = []
    for eps in slices:
        for port in eps.ports:
            if port.name != port_name or not port.HasField("port"):
                continue
            for ep in eps.endpoints:
                if not ep.conditions.HasField("ready") or ep.conditions.ready:
                    out += [f"{a}:{port.port}" for a in ep.addresses]
    return ",".join(out) or "<none>"


def _describe_pod(pod: pb.Pod) -> list[str]:
    lines = [
        f"Node:              {pod.spec.node_name or '<none>'}",
        f"Start Time:        {pod.status.start_time or '<unset>'}",
        f"Status:            {pod_status(pod)}",
        f"IP:                {pod.status.pod_ip or '<none>'}",
    ]
    owners = [f"{o.kind}/{o.name}" for o in pod.metadata.owner_references]
    lines.append(f"Controlled By:     {', '.join(owners) or '<none>'}")
    lines.append("Containers:")
    for c in pod.spec.containers:
        lines.append(f"  {c.name}:")
        lines.append(f"    Image:      {c.image}")
        ports = ", ".join(f"{p.container_port}/{p.protocol}" + (f" ({p.name})" if p.name else "") for p in c.ports)
        lines.append(f"    Ports:      {ports or '<none>'}")
        if c.command:
            lines.append(f"    Command:    {' '.join(c.command)}")
        probe = c.readiness_probe
        if probe.HasField("tcp_socket"):
            lines.append(f"    Readiness:  tcp-socket :{int_or_string(probe.tcp_socket.port)} period={probe.period_seconds}s")
        elif probe.HasField("http_get"):
            lines.append(
                f"    Readiness:  http-get :{int_or_string(probe.http_get.port)}{probe.http_get.path} "
                f"period={probe.period_seconds}s"
            )
    lines += _conditions(pod.status.conditions)
    return lines


def _describe_deployment(d: pb.Deployment, pods: list[pb.Pod]) -> list[str]:
    s = d.status
    lines = [
        f"Selector:          {_deploy_selector(d)}",
        f"Replicas:          {d.spec.replicas} desired | {s.updated_replicas} updated | {s.replicas} total | "
        f"{s.available_replicas} available | {s.unavailable_replicas} unavailable",
        f"StrategyType:      {d.spec.strategy.type}",
    ]
    lines += ["Pod Template:"] + ["  " + line for line in _map_lines("Labels:  ", dict(d.spec.template.metadata.labels))]
    for c in d.spec.template.spec.containers:
        lines.append(f"  Container {c.name}: image {c.image}, ports "
                     + (",".join(f"{p.container_port}/{p.protocol}" for p in c.ports) or "<none>"))
    lines.append("Pods:")
    for pod in pods:
        lines.append(f"  {pod.metadata.name}  {pod_status(pod)}  {pod.status.pod_ip or '<none>'}  {pod.spec.node_name or '<none>'}")
    return lines


def _describe_node(node: pb.Node, pods: list[pb.Pod]) -> list[str]:
    lines = [f"PodCIDR:           {node.spec.pod_cidr or '<none>'}", "Addresses:"]
    lines += [f"  {a.type}: {a.address}" for a in node.status.addresses]
    lines.append(f"Unschedulable:     {str(node.spec.unschedulable).lower()}")
    for title, resources in (("Capacity:", node.status.capacity), ("Allocatable:", node.status.allocatable)):
        lines.append(title)
        lines += [f"  {name}:  {value}" for name, value in sorted(resources.items())]
    ready = condition(node.status.conditions, "Ready")
    if ready is not None:
        lines.append(f"Last Heartbeat:    {ready.last_heartbeat_time}")
    lines += _conditions(node.status.conditions)
    lines.append(f"Non-terminated Pods: ({len(pods)} in total)")
    lines += [f"  {p.metadata.namespace}/{p.metadata.name}  {p.status.pod_ip or '<none>'}" for p in pods]
    return lines


def _describe_slice(eps: pb.EndpointSlice) -> list[str]:
    lines = [f"AddressType:       {eps.address_type}", "Ports:", "  Name     Port  Protocol"]
    for p in eps.ports:
        lines.append(f"  {p.name or '<unset>':<8} {p.port if p.HasField('port') else '<unset>':<5} {p.protocol}")
    lines.append("Endpoints:")
    for ep in eps.endpoints:
        c = ep.conditions
        state = ", ".join(
            f"{name}={str(getattr(c, name)).lower() if c.HasField(name) else '<unset>'}"
            for name in ("ready", "serving", "terminating")
        )
        lines.append(f"  - Addresses:  {','.join(ep.addresses)}")
        lines.append(f"    Conditions: {state}")
        if ep.node_name:
            lines.append(f"    NodeName:   {ep.node_name}")
        if ep.target_ref.name:
            lines.append(f"    TargetRef:  {ep.target_ref.kind}/{ep.target_ref.name}")
    return lines
