"""The cluster's state as a scenario waits for it: `when:` conditions, and "the manifests serve".

A `when:` condition (syntax.Condition) is evaluated against the API and, for converged(),
against every node's kube-proxy: its metrics say nothing is pending and its rules send to
every ready endpoint of every Service. serving() is what the runner waits for before the
traffic starts: every Deployment's pods Ready, every Service with as many ready endpoints as
Ready pods it selects, every LoadBalancer Service with an external IP that the cloud load
balancer sends to every Ready node (with externalTrafficPolicy Local: every Ready node that has
a ready endpoint of it, as its health checks find), and every node's kube-proxy converged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from testbed.cluster import cloud_lb
from testbed.cluster.proxy_readback import ENDPOINTS_PENDING, SERVICES_PENDING, NodeProxy
from testbed.api.selectors import label_selector_requirements, labels_match
from testbed.scenario.convergence import rules_match
from testbed.scenario.live import Live, active, is_ready, node_ip, ready_addresses, ready_endpoints
from testbed.scenario.syntax import Condition

SERVE_POLL_S = 0.2


@dataclass(frozen=True)
class State:
    """Whether something holds now, and what was seen (for progress and errors)."""

    holds: bool
    detail: str


class ClusterState:
    def __init__(self, live: Live, cluster: str, state_dir: Path) -> None:
        self.live, self.cluster, self.state_dir = live, cluster, state_dir

    def proxies(self, nodes: list[str] | None = None) -> dict[str, NodeProxy]:
        names = nodes if nodes is not None else [n.metadata.name for n in self.live.nodes()]
        return {node: NodeProxy(self.cluster, self.state_dir, node) for node in names}

    # ---- when: conditions ------------------------------------------------------------------------

    def condition(self, condition: Condition) -> State:
        fn, arg = condition.function, condition.argument
        if fn == "converged":
            return self.converged([arg] if arg else None)
        if fn == "endpoints":
            count = len(ready_addresses(self.live.slices(arg)))
        elif fn == "pods":
            count = len(self.live.ready_pods(arg))
        else:  # readyNodes
            count = sum(is_ready(n) for n in self.live.nodes())
        return State(condition.comparison.holds(count), f"{fn}({arg}) = {count}")

    def endpoints_everywhere(self) -> list[str]:
        """Every ready endpoint ip:port of every Service."""
        found: set[str] = set()
        for svc in self.live.list("Service", ""):
            found.update(ready_endpoints(self.live.slices(f"{svc.metadata.namespace}/{svc.metadata.name}")))
        return sorted(found)

    def converged(self, nodes: list[str] | None = None) -> State:
        """Each node's kube-proxy answers, has nothing pending and sends to every ready endpoint."""
        endpoints = self.endpoints_everywhere()
        proxies = self.proxies(nodes)
        check = rules_match(proxies, contain=endpoints)
        behind = []
        for node, proxy in proxies.items():
            try:
                metrics = proxy.metrics()
            except OSError:
                behind.append(f"{node} (kube-proxy does not answer)")
                continue
            pending = metrics.get(ENDPOINTS_PENDING, 0) + metrics.get(SERVICES_PENDING, 0)
            if pending or not check(node):
                behind.append(f"{node} ({'changes pending' if pending else 'rules lack endpoints'})")
        subject = ", ".join(proxies)
        return State(not behind, f"converged({subject}): " + (", ".join(behind) + " behind" if behind else "yes")
                     + f" ({len(endpoints)} endpoints)")

    # ---- the manifests serve ---------------------------------------------------------------------

    def serving(self) -> State:
        problems = self._workloads() + self._services()
        if not problems:
            converged = self.converged()
            if not converged.holds:
                problems.append(converged.detail)
        return State(not problems, "; ".join(problems) or "serving")

    def _workloads(self) -> list[str]:
        problems = []
        for deploy in self.live.list("Deployment", ""):
            ns, name = deploy.metadata.namespace, deploy.metadata.name
            requirements = label_selector_requirements(deploy.spec.selector)
            pods = [p for p in self.live.list("Pod", ns) if active(p) and labels_match(requirements, p.metadata.labels)]
            ready = sum(is_ready(p) for p in pods)
            if ready < deploy.spec.replicas or len(pods) != deploy.spec.replicas:
                problems.append(f"deployment {ns}/{name}: {ready}/{deploy.spec.replicas} pods Ready")
        return problems

    def _services(self) -> list[str]:
        problems = []
        ready_nodes = {n.metadata.name: node_ip(n) for n in self.live.nodes() if is_ready(n)}
        table = None
        for svc in self.live.list("Service", ""):
            ns, name = svc.metadata.namespace, svc.metadata.name
            slices = self.live.slices(f"{ns}/{name}")
            if svc.spec.selector:
                selected = [p for p in self.live.list("Pod", ns) if active(p) and is_ready(p)
                            and all(p.metadata.labels.get(k) == v for k, v in svc.spec.selector.items())]
                have = ready_addresses(slices)
                if len(have) != len(selected):
                    problems.append(f"service {ns}/{name}: {len(have)}/{len(selected)} ready endpoints")
            if svc.spec.type == "LoadBalancer":
                ingress = [i.ip for i in svc.status.load_balancer.ingress if i.ip]
                if not ingress:
                    problems.append(f"service {ns}/{name}: no external IP yet")
                    continue
                table = table if table is not None else cloud_lb.published_table(self.state_dir).by_ip()
                backends = sorted(table[ingress[0]].backends) if ingress[0] in table else []
                wanted = _balanced_nodes(svc, slices, ready_nodes)
                if backends != wanted:
                    problems.append(f"service {ns}/{name}: the load balancer sends to {len(backends)}/"
                                    f"{len(wanted)} nodes")
        return problems


def _balanced_nodes(svc, slices, ready_nodes: dict[str, str]) -> list[str]:
    """The addresses of the nodes the load balancer should send a Service to: every Ready node,
    or with externalTrafficPolicy Local those with a ready endpoint of it (the others fail the
    health check of its healthCheckNodePort)."""
    if svc.spec.external_traffic_policy != "Local":
        return sorted(ready_nodes.values())
    hosting = {e.node_name for eps in slices for e in eps.endpoints if e.conditions.ready}
    return sorted(ip for node, ip in ready_nodes.items() if node in hosting)


def wait_until(check, timeout: float, poll: float = SERVE_POLL_S) -> State:
    """Poll check() -> State until it holds or timeout s passed; the last State either way."""
    deadline = time.monotonic() + timeout
    while True:
        state = check()
        if state.holds or time.monotonic() >= deadline:
            return state
        time.sleep(poll)

