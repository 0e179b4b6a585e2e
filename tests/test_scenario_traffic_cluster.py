"""Scenario traffic generators in a real cluster: probes inside the client's, a node's and a pod's namespace.

One 3-node cluster for the module (tests/lb_lab.py: its IP plan, the Deployment `web`
of 3 pods behind the LoadBalancer Service `web`), plus a NodePort Service over the same
pods, a UDP Deployment behind a UDP NodePort Service and a Service without endpoints.
Every generator is a real probe process (testbed/scenario/traffic.py) started by pid in
its source's namespace; the verdicts are the scenario assertions' (assertions.py).
"""

from __future__ import annotations

import time

import pytest

from testbed import naming
from testbed.cluster.proxy_readback import NodeProxy
from testbed.scenario import assertions as A
from testbed.scenario.convergence import (change_applied, converged_within, rules_match, rules_result, synced_since,
                                          watch_convergence)
from testbed.scenario.records import Record, Window
from testbed.scenario.traffic import GeneratorSpec, GeneratorSummary, Traffic
from testbed.scenario.units import Comparison
from tests.lb_lab import CLIENT, NODES, apply, curl, get_json, lab, ready_pods, web  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cluster

EXTRAS = """apiVersion: v1
kind: Service
metadata: {name: webnp}
spec: {type: NodePort, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: nobody}
spec: {selector: {app: nobody}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: udpe}
spec:
  replicas: 2
  selector: {matchLabels: {app: udpe}}
  template:
    metadata: {labels: {app: udpe}}
    spec: {containers: [{name: echo, image: echo, ports: [{containerPort: 9000, protocol: UDP}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: udpnp}
spec: {type: NodePort, selector: {app: udpe}, ports: [{port: 53000, targetPort: 9000, protocol: UDP}]}
"""


@pytest.fixture(scope="module")
def extras(lab, web):
    """NodePort webnp over web's pods, nobody (no endpoints), udpe behind the UDP NodePort udpnp."""
    apply(lab, EXTRAS)
    ready_pods(lab, "udpe", 2)
    node_port = lab.json("svc", "webnp")["spec"]["ports"][0]["nodePort"]
    get_json(lab, f"http://{NODES['node1']}:{node_port}/")  # kube-proxy has the new Services
    return {"web": web, "webnp": node_port, "nobody": lab.json("svc", "nobody")["spec"]["clusterIP"],
            "udpnp": lab.json("svc", "udpnp")["spec"]["ports"][0]["nodePort"]}


def web_pods(lab) -> list[dict]:
    return ready_pods(lab, "web", 3)


def play(lab, tmp_path, *specs: GeneratorSpec) -> tuple[dict[str, GeneratorSummary], dict[str, list[Record]]]:
    with Traffic(list(specs), time.monotonic() + 0.5, tmp_path) as traffic:
        summaries = traffic.wait()
    return summaries, traffic.records()


def source(lab, host: str) -> str:
    return naming.node_netns(lab.name, host)


def test_client_to_a_node_port_and_to_the_external_ip(lab, extras, tmp_path):
    pods = [p["metadata"]["name"] for p in web_pods(lab)]
    client = source(lab, "client")
    summaries, records = play(
        lab, tmp_path,
        GeneratorSpec("nodeport", client, f"http://{NODES['node2']}:{extras['webnp']}/", rate=20, stop=3),
        GeneratorSpec("external", client, f"http://{extras['web']}/", rate=20, stop=3))
    window = Window(0, 3, "[start, end]")
    for name in ("nodeport", "external"):
        summary = summaries[name]
        assert summary.sent == 60 and summary.rate_kept and abs(summary.achieved_rate - 20) <= 1, summary
        results = [A.success_rate("all ok", name, records[name], window, Comparison.parse(">= 1.0")),
                   A.balance("spread", name, records[name], window, pods=pods),
                   A.client_ip("masqueraded", name, records[name], window, "masqueraded")]  # Cluster policy
        assert all(r.passed for r in results), [r.message for r in results]
        assert all(r.source.startswith(CLIENT + ":") and r.node in NODES for r in records[name])


def test_pod_to_a_service_by_its_dns_name(lab, extras, tmp_path):
    pod = web_pods(lab)[0]
    netns = naming.pod_netns(lab.name, pod["metadata"]["uid"])
    summaries, records = play(
        lab, tmp_path,
        GeneratorSpec("short", netns, "http://web/", rate=10, stop=2, source=f"pod:{pod['metadata']['name']}"),
        GeneratorSpec("full", netns, "http://web.default.svc.cluster.local/", rate=10, stop=2),
        GeneratorSpec("missing", netns, "http://no-such-service/", rate=10, stop=2))
    names = {p["metadata"]["name"] for p in web_pods(lab)}
    for name in ("short", "full"):
        assert summaries[name].outcomes == {"ok": 20}, records[name][:3]
        assert {r.pod for r in records[name]} <= names and all(r.source.startswith(pod["status"]["podIP"] + ":")
                                                               for r in records[name])
    assert summaries["missing"].outcomes == {"dns-error": 20}, records["missing"][:3]  # NXDOMAIN from cluster DNS
    assert "no-such-service" in records["missing"][0].error


def test_keepalive_reuses_its_connections_and_new_opens_one_per_request(lab, extras, tmp_path):
    client = source(lab, "client")
    url = f"http://{extras['web']}/"
    summaries, records = play(lab, tmp_path, GeneratorSpec("new", client, url, rate=20, stop=2),
                              GeneratorSpec("kept", client, url, rate=20, stop=2, connections="keepalive", pool=2))
    assert summaries["new"].outcomes == {"ok": 40} and summaries["kept"].outcomes == {"ok": 40}
    assert len({r.source for r in records["new"]}) == 40 == summaries["new"].connections_opened
    assert len({r.source for r in records["kept"]}) == 2 == summaries["kept"].connections_opened
    for conn in (1, 2):  # one connection, one pod: conntrack keeps an established connection on its endpoint
        assert len({r.pod for r in records["kept"] if r.conn == conn}) == 1, records["kept"]


def test_udp_to_a_node_port(lab, extras, tmp_path):
    summaries, records = play(lab, tmp_path, GeneratorSpec("udp", source(lab, "client"),
                                                           f"{NODES['node3']}:{extras['udpnp']}", protocol="udp",
                                                           rate=10, stop=2))
    assert summaries["udp"].outcomes == {"ok": 20}, records["udp"][:3]
    assert all(r.pod.startswith("udpe-") for r in records["udp"]) and len({r.source for r in records["udp"]}) == 20


def wait_rejected(lab, ip: str) -> None:
    deadline = time.monotonic() + 10
    while curl_exit(lab, ip) != 7:  # 7: refused (kube-proxy's REJECT is in place)
        assert time.monotonic() < deadline
        time.sleep(0.2)


def curl_exit(lab, ip: str) -> int:
    return lab.exec("node1", "curl", "-s", "--max-time", "2", f"http://{ip}/").returncode


def test_a_service_without_endpoints_is_refused_at_once(lab, extras, tmp_path):
    wait_rejected(lab, extras["nobody"])
    summaries, records = play(lab, tmp_path, GeneratorSpec("none", source(lab, "node1"), f"http://{extras['nobody']}/",
                                                           rate=10, stop=1, timeout=2))
    assert summaries["none"].outcomes == {"refused": 10}
    assert all(r.latency_ms < 200 for r in records["none"]), records["none"]  # not a timeout
    assert curl(lab, f"http://{extras['web']}/").returncode == 0


def test_a_rate_the_machine_cannot_keep_is_reported_lower(lab, extras, tmp_path):
    wait_rejected(lab, extras["nobody"])
    summaries, records = play(lab, tmp_path, GeneratorSpec("flood", source(lab, "node1"),
                                                           f"http://{extras['nobody']}/", rate=20_000, stop=1.5,
                                                           max_inflight=20))
    flood = summaries["flood"]
    assert flood.planned == 30_000 and flood.sent == len(records["flood"]) < 15_000, flood
    assert flood.achieved_rate < 10_000 and not flood.rate_kept and flood.late_starts > flood.sent / 2
    # refused, or timed out once the kernel's ICMP rate limit (icmp_msgs_per_sec) holds back the REJECT's answer
    assert flood.outcomes.get("refused", 0) > 0 and set(flood.outcomes) <= {"refused", "timeout"}, flood


def proxies(lab) -> dict[str, NodeProxy]:
    return {node: NodeProxy(lab.name, lab.state, node) for node in NODES}


def test_every_nodes_kube_proxy_applies_a_scale_read_from_its_metrics_and_rules(lab, extras):
    nodes = proxies(lab)
    before = {p["status"]["podIP"] for p in ready_pods(lab, "udpe", 2)}
    t0 = time.monotonic()
    applied = change_applied(nodes)  # baselines read before the action
    assert not any(applied(node) for node in NODES)  # nothing changed yet
    lab.svclab("scale", "deployment", "udpe", "--replicas", "3", check=True)
    seen = watch_convergence(applied, list(NODES), "scale", time.monotonic() - t0, t0, timeout=15)
    result = converged_within("converged", seen, 10.0)
    assert result.passed, result.message
    three = {p["status"]["podIP"] for p in ready_pods(lab, "udpe", 3)}
    endpoint = f"{(three - before).pop()}:9000"
    window = Window(0, 60)
    for node, proxy in nodes.items():  # the rules say the same as the metrics, in the kernel's own dump
        rules = proxy.rules()
        assert rules_result("has it", node, endpoint, True, rules, 1.0, window).passed
        assert not rules_result("gone", node, endpoint, False, rules, 1.0, window).passed
    t1 = time.monotonic()
    lab.svclab("scale", "deployment", "udpe", "--replicas", "2", check=True)
    two = {p["status"]["podIP"] for p in ready_pods(lab, "udpe", 2)}
    removed = [f"{ip}:9000" for ip in three - two]
    gone = rules_match(nodes, contain=[f"{ip}:9000" for ip in two], lack=removed)
    seen = watch_convergence(gone, list(NODES), "scale down", 0.0, t1, timeout=15)
    assert len(removed) == 1 and converged_within("gone", seen, 10).passed, seen
    # a sync that never comes: not converged, and the assertion says which nodes
    never = watch_convergence(synced_since(nodes, time.time() + 3600), list(NODES), "never", 0.0, time.monotonic(),
                              timeout=0.3)
    result = converged_within("never", never, 10.0)
    assert not result.passed and "node1 not within 0.3s" in result.measured
