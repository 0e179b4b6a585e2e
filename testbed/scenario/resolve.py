"""What a scenario names by meaning, resolved against the running cluster.

Addresses (`${clusterIP:frontend-service}`, `${nodeIP:node1}`, `${nodePort:svc[:port-name]}`,
`${externalIP:frontend-lb}`, `${podIP:<pod, selector or action>}`) become addresses, traffic
sources (client, nodeN, pod:<name>, pod:<selector>) become network namespaces, and a
TrafficSpec becomes the GeneratorSpec that traffic.py runs. A name that does not resolve
raises Unresolved, which says what was looked for and what was found instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from testbed import naming
from testbed.api.errors import NotFound
from testbed.scenario.live import Live, PodInfo, active, is_ready, node_ip, split_name
from testbed.scenario.model import Scenario, TrafficSpec
from testbed.scenario.syntax import Host, Template, substitute
from testbed.scenario.traffic import GeneratorSpec


class Unresolved(LookupError):
    """A name of the scenario that the cluster does not have (str(): which, and why)."""


#: the pods an action picked (pod-delete, pod-kill) or found on its node (node-crash, node-freeze), by label
Picks = Callable[[str], "list[PodInfo] | None"]


class Resolver:
    def __init__(self, live: Live, cluster: str, picks: Picks = lambda _label: None) -> None:
        self.live, self.cluster, self.picks = live, cluster, picks

    def address(self, text: str) -> str:
        """text with every ${kind:argument} replaced by what it names now."""
        return substitute(text, self.template)

    def template(self, template: Template) -> str:
        kind, arg = template.kind, template.argument
        try:
            if kind == "nodeIP":
                return self.node_ip(arg)
            if kind == "podIP":
                return self.pod_ip(arg)
            service_name, _, port_name = arg.partition(":")
            svc = self.live.service(service_name)
        except NotFound as exc:
            raise Unresolved(f"{template.text}: {exc.message}") from None
        if kind == "clusterIP":
            if not svc.spec.cluster_ip or svc.spec.cluster_ip == "None":
                raise Unresolved(f"{template.text}: Service {service_name} has no ClusterIP (headless)")
            return svc.spec.cluster_ip
        if kind == "externalIP":
            ingress = [i.ip for i in svc.status.load_balancer.ingress if i.ip]
            if not ingress:
                raise Unresolved(f"{template.text}: Service {service_name} has no external IP "
                                 f"(type {svc.spec.type or 'ClusterIP'})")
            return ingress[0]
        ports = [p for p in svc.spec.ports if not port_name or p.name == port_name]
        if not ports or not ports[0].node_port:
            what = f"port {port_name!r}" if port_name else "nodePort"
            raise Unresolved(f"{template.text}: Service {service_name} has no {what} (type {svc.spec.type or 'ClusterIP'})")
        return str(ports[0].node_port)

    def node_ip(self, node: str) -> str:
        found = next((n for n in self.live.nodes() if n.metadata.name == node), None)
        if found is None or not node_ip(found):
            raise Unresolved(f"${{nodeIP:{node}}}: no node {node} with an address")
        return node_ip(found)

    def pod_ip(self, ref: str) -> str:
        picked = self.picks(ref)
        if picked is not None:
            if not picked or not picked[0].ip:
                raise Unresolved(f"${{podIP:{ref}}}: action {ref} picked no pod with an address")
            return picked[0].ip
        if any(c in ref for c in "=!") or " in " in ref:
            pods = self.live.ready_pods(ref)
            if not pods:
                raise Unresolved(f"${{podIP:{ref}}}: no Ready pod matches {ref}")
            return pods[0].status.pod_ip
        namespace, name = split_name(ref)
        try:
            pod = self.live.get("Pod", name, namespace)
        except NotFound:
            raise Unresolved(f"${{podIP:{ref}}}: no pod named {name} (nor an action of that name that picks pods)") from None
        if not pod.status.pod_ip:
            raise Unresolved(f"${{podIP:{ref}}}: pod {name} has no address yet (phase {pod.status.phase or 'Pending'})")
        return pod.status.pod_ip

    def source(self, host: Host) -> tuple[str, str]:
        """(network namespace, how reports name it) of a traffic source."""
        if host.kind in ("client", "node"):
            name = "client" if host.kind == "client" else host.node
            return naming.node_netns(self.cluster, name), name
        ref = host.pod
        if ref.selector is not None:
            pods = self.live.ready_pods(ref.selector)
            if not pods:
                raise Unresolved(f"from: {host}: no Ready pod matches {ref.selector}")
            pod = pods[0]
        else:
            namespace, name = split_name(ref.name)
            try:
                pod = self.live.get("Pod", name, namespace)
            except NotFound:
                raise Unresolved(f"from: {host}: no pod named {name}") from None
            if not (active(pod) and is_ready(pod)):
                raise Unresolved(f"from: {host}: pod {name} is not Ready (phase {pod.status.phase or 'Pending'})")
        netns = naming.pod_netns(self.cluster, pod.metadata.uid)
        if not Path(naming.netns_path(netns)).exists():
            raise Unresolved(f"from: {host}: pod {pod.metadata.name} has no network namespace")
        return netns, f"pod:{pod.metadata.name}"

    def generator(self, spec: TrafficSpec, duration: float) -> GeneratorSpec:
        """The generator a TrafficSpec asks for, its addresses resolved now."""
        netns, source = self.source(spec.source)
        try:
            target = self.address(spec.destination)
        except Unresolved as exc:
            raise Unresolved(f"to: {exc}") from None
        return GeneratorSpec(spec.name, netns, target, rate=spec.rate, stop=spec.stop if spec.stop is not None else duration,
                             start=spec.start, protocol=spec.kind, connections=spec.connections, timeout=spec.timeout,
                             pool=spec.pool or 1, source=source)


def generator_specs(scenario: Scenario, resolver: Resolver) -> list[GeneratorSpec]:
    """Every generator of the scenario; Unresolved naming the generator whose source or target is missing."""
    specs = []
    for spec in scenario.traffic:
        try:
            specs.append(resolver.generator(spec, scenario.duration))
        except Unresolved as exc:
            raise Unresolved(f"traffic {spec.name}: {exc}") from None
    return specs
