"""The seed's Deployment scaled to 800 replicas on 3 nodes (issue #10, section 2), end to end.

Each node takes 110 pods (the kubelet's default --max-pods; its /24 holds 253): 330 pods
run, DNS's two included, and the rest stay Pending with kube-scheduler's message. The
pods that ran before keep running and serving, DNS keeps answering, and no kubelet exits
(before, each kubelet died at its 254th pod with "pod CIDR ... is full", and every pod with it).
"""

from __future__ import annotations

import json
import re
import sys
import time

import pytest

from tests.test_cluster import DIG, SEED, LabCluster, make_cluster, pods_by_name  # noqa: F401 (fixture)

pytestmark = pytest.mark.cluster

REPLICAS = 800
MESSAGE = "0/3 nodes are available: 3 Too many pods."


def components(c: LabCluster) -> dict:
    report = json.loads(c.svclab("status", "-o", "json", check=True).stdout)
    return {x["name"]: x for x in report["components"]}


def ready(pod: dict) -> bool:
    return pod["status"].get("phase") == "Running" and any(
        x["type"] == "Ready" and x["status"] == "True" for x in pod["status"].get("conditions", []))


def all_pods(c: LabCluster) -> list[dict]:
    return c.json("pods", "-A")["items"]


def wait_settled(c: LabCluster, capacity: int, timeout: float) -> list[dict]:
    """Until `capacity` pods run Ready and every other frontend pod is Pending with the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = all_pods(c)
        frontend = [p for p in pods if p["metadata"]["name"].startswith("frontend-")]
        pending = [p for p in frontend if not p["spec"].get("nodeName")]
        if (sum(ready(p) for p in pods) == capacity and len(frontend) == REPLICAS
                and all(_unschedulable(p) == MESSAGE for p in pending)):
            return pods
        time.sleep(2)
    raise AssertionError(f"not settled in {timeout}s: {sum(ready(p) for p in pods)} ready of {len(pods)}")


def _unschedulable(pod: dict) -> str | None:
    cond = next((x for x in pod["status"].get("conditions", []) if x["type"] == "PodScheduled"), {})
    return cond.get("message") if (cond.get("status"), cond.get("reason")) == ("False", "Unschedulable") else None


def test_800_replicas_on_3_nodes_fill_capacity_and_the_rest_stay_pending(make_cluster):
    c = make_cluster()
    c.up("-f", f"{SEED}/frontend-deployment.yaml", "-f", f"{SEED}/service-nodeport.yaml")
    nodes = c.json("nodes")["items"]
    assert [(n["status"]["capacity"]["pods"], n["status"]["allocatable"]["pods"]) for n in nodes] == [("110", "110")] * 3
    before = {name: p["status"]["podIP"] for name, p in pods_by_name(c).items() if name.startswith("frontend-")}
    kubelets = {name: x["pid"] for name, x in components(c).items() if name.startswith("kubelet-")}
    assert len(before) == 3 and len(kubelets) == 3

    started = time.monotonic()
    c.svclab("scale", "deployment", "frontend", "--replicas", str(REPLICAS), check=True)
    pods = wait_settled(c, capacity=330, timeout=150)
    print(f"800 replicas settled (330 running, the rest Pending) in {time.monotonic() - started:.1f} s")

    per_node: dict[str, int] = {}
    for p in pods:
        if p["spec"].get("nodeName"):
            per_node[p["spec"]["nodeName"]] = per_node.get(p["spec"]["nodeName"], 0) + 1
    assert per_node == {"node1": 110, "node2": 110, "node3": 110}
    pending = sorted(p["metadata"]["name"] for p in pods if not p["spec"].get("nodeName"))
    assert len(pending) == REPLICAS - (330 - 2)  # the two DNS pods hold their places
    shown = c.svclab("describe", "pod", pending[0], check=True).stdout
    assert re.search(r"PodScheduled\s+False\s+Unschedulable\s+" + re.escape(MESSAGE), shown), shown
    assert re.search(rf"{pending[0]}\s+0/1\s+Pending", c.svclab("get", "pods", check=True).stdout)

    # the kubelets never exited; the pods from before still run, with their addresses, and serve
    now = components(c)
    assert {name: now[name]["pid"] for name in kubelets} == kubelets
    assert all(now[name]["restarts"] == 0 for name in kubelets)
    after = pods_by_name(c)
    assert {name: after[name]["status"]["podIP"] for name in before} == before
    assert all(ready(after[name]) for name in before)
    first, *others = sorted(before)
    for name in others:
        r = c.exec(first, "curl", "-s", "--max-time", "5", f"http://{before[name]}:8080/")
        assert r.returncode == 0 and json.loads(r.stdout)["pod"] == name, r.stderr
    # DNS: its pods still answer, and a pod reaches the Service by name
    server = next(p["status"]["podIP"] for n, p in pods_by_name(c, "kube-system").items() if n.startswith("coredns-"))
    svc = c.json("svc", "frontend-service")
    r = c.exec("node1", sys.executable, "-c", DIG, server, "frontend-service.default.svc.cluster.local", "A", "udp")
    assert json.loads(r.stdout) == {"rcode": "NOERROR", "answers": [svc["spec"]["clusterIP"]]}, r.stderr
    r = c.exec(first, "curl", "-s", "--max-time", "5", "http://frontend-service")
    assert r.returncode == 0 and json.loads(r.stdout)["pod"].startswith("frontend-"), r.stderr
