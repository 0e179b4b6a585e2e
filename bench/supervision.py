"""Supervision benchmark: how long a kill -9'd component takes to serve again.

Goal (reliability issue): a killed kube-proxy, kubelet, controller-manager, cloud-controller
or lb-controller serves again within 3 s. Per component and run: kill -9 its process, then
measure kill -> the supervisor runs a new process ("back") and kill -> it does its job again
("serving"):

    kube-proxy   its /healthz reports a sync after the kill, and the NodePort answers on its node
    kubelet      the node's pods answer again (their servers are the kubelet's children)
    controller-manager  a pod deleted right after the kill has a replacement
    cloud-controller    its table feed answers again (the load balancer's health checks run)
    lb-controller       the switch's OpenFlow connection is established with the new process (the
                        kernel's socket table: ovs-vsctl's is_connected lags by up to ~5 s) and the
                        external IP answers
    apiserver    a write (a label on the Deployment) succeeds

The lb-controller is killed under traffic too: a scenario traffic generator
(testbed/scenario/traffic.py, in the client's namespace) opens 20 new connections/s through
the external IP, each bounded by 1 s, from 2 s before the kill until 2 s after the new
controller serves; the report counts the connections attempted and failed between the kill
and the restarted controller serving, and in the whole run. Goal: at most the connections of
that window fail; with the switch balancing by itself (select groups, conntrack NAT), none.

    PYTHONPATH=. python -m bench.supervision [--runs 3] [--components lb-controller]

--components limits the kills to some components (the under-traffic case runs when
lb-controller is among them): `--runs 1 --components lb-controller` is a quick check.

The cluster (3 nodes, the seed Deployment with its NodePort Service and a LoadBalancer
Service) is named bs*, lives under a temporary --state-root and is torn down whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import string
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

from bench.cluster import svclab, teardown
from bench.common import REPO, RESULTS, percentile, print_table
from testbed import naming
from testbed.client.client import ApiClient
from testbed.cluster import cloud_lb
from testbed.cluster.processes import ProcessTable
from testbed.node.podnet import entered_netns
from testbed.paths import StateDir
from testbed.scenario.records import Record, Window, in_window, outcome_counts
from testbed.scenario.traffic import Generator, GeneratorSpec

GOAL_S = 3.0
NODE_IPS = {"node1": "172.18.0.2", "node2": "172.18.0.3", "node3": "172.18.0.4"}
LB = """apiVersion: v1
kind: Service
metadata: {name: frontend-lb}
spec: {type: LoadBalancer, selector: {app: frontend}, ports: [{port: 80, targetPort: 8080}]}
"""


class Lab:
    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name
        self.state = StateDir(root / name)

    def pid(self, process: str) -> int:
        return json.loads((self.state.path / "processes.json").read_text())[process]["pid"]

    def http(self, host: str, url: str, timeout: float = 1.0) -> dict | None:
        """GET url from inside a host's namespace (client, node1, ...), in this process."""
        try:
            with entered_netns(naming.node_netns(self.name, host)):
                with urllib.request.urlopen(url, timeout=timeout) as answer:
                    return json.load(answer)
        except (OSError, ValueError):
            return None

    def api(self, fn: Callable) -> object:
        async def call():
            async with ApiClient.for_state_dir(self.state) as client:
                return await fn(client)
        try:
            return asyncio.run(asyncio.wait_for(call(), 2))
        except Exception:  # the API server may be the one that is down
            return None


def wait(check: Callable[[], object], timeout: float = 30.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            return float("inf")
        time.sleep(0.02)
    return time.monotonic()


def external_ip(lab: Lab) -> str:
    async def get(client):
        svc = await client.get("Service", "frontend-lb", "default")
        return svc.status.load_balancer.ingress[0].ip if svc.status.load_balancer.ingress else ""
    deadline = time.monotonic() + 30
    while not (ip := lab.api(get)):
        if time.monotonic() > deadline:
            raise RuntimeError("frontend-lb got no external IP")
        time.sleep(0.1)
    return str(ip)


def serving_check(lab: Lab, process: str, killed_at: float, lb_ip: str) -> Callable[[], object]:
    """What "serving again" means for this component (called after the kill)."""
    _, _, index = process.partition("-node")
    node = f"node{index}" if index else ""
    if process.startswith("kube-proxy"):
        def synced():
            health = lab.http(node, f"http://{NODE_IPS[node]}:10249/healthz")
            fresh = health and health["lastUpdated"] >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(killed_at))
            return fresh and lab.http("client", f"http://{NODE_IPS[node]}:30007/")
        return synced
    if process.startswith("kubelet"):
        async def ips_on_node(client):
            pods, _ = await client.list("Pod", "default", label_selector="app=frontend")
            return [p.status.pod_ip for p in pods if p.spec.node_name == node and p.status.pod_ip]
        ips = lab.api(ips_on_node) or []
        return lambda: all(lab.http(node, f"http://{ip}:8080/") for ip in ips)
    if process == "controller-manager":
        return replacement_check(lab)
    if process == "cloud-controller":
        return lambda: _feed_answers(lab)
    if process == "lb-controller":
        return lambda: switch_connected_to(lab, lab.pid(process)) and lab.http("client", f"http://{lb_ip}/")
    if process == "apiserver":
        async def write(client):
            d = await client.get("Deployment", "frontend", "default")
            d.metadata.labels["bench"] = str(time.time())
            return await client.update(d)
        return lambda: lab.api(write)
    raise ValueError(process)


def switch_connected_to(lab: Lab, pid: int) -> bool:
    """ovs-vswitchd's OpenFlow connection is ESTABLISHED to a socket of process `pid` (the app accepted it)."""
    port = ProcessTable(lab.state.path).load()["lb-controller"].flag("--openflow-port")
    sockets = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True).stdout
    return f"pid={pid}," in sockets


def _feed_answers(lab: Lab) -> bool:
    try:
        cloud_lb.published_table(lab.state.path, timeout=0.5)
        return True
    except (OSError, ValueError):
        return False


def replacement_check(lab: Lab) -> Callable[[], object]:
    async def delete_one(client):
        pods, _ = await client.list("Pod", "default", label_selector="app=frontend")
        await client.delete("Pod", pods[0].metadata.name, "default")
        return {p.metadata.name for p in pods}
    before = lab.api(delete_one) or set()

    async def replaced(client):
        pods, _ = await client.list("Pod", "default", label_selector="app=frontend")
        return any(p.metadata.name not in before for p in pods)
    return lambda: lab.api(replaced)


def measure(lab: Lab, process: str, lb_ip: str) -> tuple[float, float]:
    back, serving, _ = kill_and_wait(lab, process, lb_ip)
    return back, serving


def kill_and_wait(lab: Lab, process: str, lb_ip: str) -> tuple[float, float, float]:
    """kill -9; seconds to back and to serving, and the kill's time.monotonic()."""
    old = lab.pid(process)
    killed_at = time.time()
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    check = serving_check(lab, process, killed_at, lb_ip)
    back = wait(lambda: lab.pid(process) != old and os.path.exists(f"/proc/{lab.pid(process)}")) - t0
    serving = wait(check) - t0
    wait(lambda: lab.http("client", "http://172.18.0.2:30007/") and lab.http("client", f"http://{lb_ip}/"))
    time.sleep(1)  # settle (slices, health checks) before the next kill
    return back, serving, t0


LEAD_S, TAIL_S, RATE, REQUEST_TIMEOUT = 2.0, 2.0, 20.0, 1.0


def measure_under_traffic(lab: Lab, process: str, lb_ip: str) -> dict:
    """kill -9 while the client opens RATE new connections/s through the external IP."""
    spec = GeneratorSpec("lb-kill", naming.node_netns(lab.name, "client"), f"http://{lb_ip}/", rate=RATE,
                         stop=LEAD_S + 60, timeout=REQUEST_TIMEOUT, source="client")
    generator = Generator(spec, time.monotonic() + 0.2, Path(tempfile.mkdtemp(prefix="lb-kill-", dir=lab.root)))
    generator.start()
    try:
        generator.wait_ready()
        time.sleep(max(0.0, generator.t0 + LEAD_S - time.monotonic()))
        back, serving, killed = kill_and_wait(lab, process, lb_ip)
        time.sleep(TAIL_S)
    finally:
        generator.stop()  # ends it early: it finishes the requests under way and writes its records
    return {"back": back, "serving": serving,
            **traffic_counts(generator.records(), Window(killed - generator.t0, killed - generator.t0 + serving))}


def traffic_counts(records: list[Record], kill_to_serving: Window) -> dict:
    """Requests attempted/failed in the kill -> serving window and in the whole run."""
    window = in_window(records, kill_to_serving)
    failed = [r for r in records if not r.ok]
    return {"window_attempted": len(window), "window_failed": sum(not r.ok for r in window),
            "attempted": len(records), "failed": len(failed), "errors": outcome_counts(failed)}


PROCESSES = ["kube-proxy-node1", "kubelet-node2", "controller-manager", "cloud-controller", "lb-controller",
             "apiserver"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--components", type=lambda text: text.split(","), default=PROCESSES,
                        help=f"comma-separated, of {','.join(PROCESSES)} (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.components) - set(PROCESSES))
    if unknown:
        parser.error(f"unknown components: {', '.join(unknown)}")
    name = "bs" + "".join(random.choices(string.ascii_lowercase, k=4))
    seed = REPO / "scenarios/manifests/seed"
    with tempfile.TemporaryDirectory(prefix="svclab-bench-") as tmp:
        root = Path(tmp)
        lab = Lab(root, name)
        try:
            up = svclab(root, name, "up", "--detach", "-f", str(seed / "frontend-deployment.yaml"),
                        "-f", str(seed / "service-nodeport.yaml"), timeout=180)
            if up.returncode != 0:
                raise RuntimeError(f"svclab up failed: {up.stderr}")
            (root / "lb.yaml").write_text(LB)
            svclab(root, name, "apply", "-f", str(root / "lb.yaml"))
            lb_ip = external_ip(lab)
            wait(lambda: lab.http("client", f"http://{lb_ip}/"))
            results = {p: [measure(lab, p, lb_ip) for _ in range(args.runs)] for p in PROCESSES
                       if p in args.components}
            traffic = [measure_under_traffic(lab, "lb-controller", lb_ip) for _ in range(args.runs)
                       if "lb-controller" in args.components]
        finally:
            teardown(root, name)
    report(results, traffic)


def report(results: dict[str, list[tuple[float, float]]], traffic: list[dict]) -> None:
    rows = []
    for process, runs in results.items():
        back, serving = [r[0] for r in runs], [r[1] for r in runs]
        verdict = "" if process == "apiserver" else ("PASS" if max(serving) <= GOAL_S else "FAIL")
        rows.append([process, str(len(runs)), f"{percentile(back, 50):.2f}", f"{max(back):.2f}",
                     f"{percentile(serving, 50):.2f}", f"{max(serving):.2f}", verdict])
    print_table(f"kill -9 -> back / serving again (s), goal <= {GOAL_S:.0f} s",
                ["component", "runs", "back p50", "back max", "serving p50", "serving max", "goal"], rows)
    rows = [[str(i + 1), f"{t['back']:.2f}", f"{t['serving']:.2f}", f"{t['window_failed']} / {t['window_attempted']}",
             f"{t['failed']} / {t['attempted']}", ", ".join(f"{k} {v}" for k, v in t["errors"].items()) or "-"]
            for i, t in enumerate(traffic)]
    if rows:
        print_table(f"lb-controller kill -9 under {RATE:g} new connections/s through the external IP",
                    ["run", "back s", "serving s", "failed / attempted, kill -> serving", "failed / attempted, run",
                     "errors"], rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "supervision.json").write_text(json.dumps({"kill": results, "lb_controller_under_traffic": traffic},
                                                         indent=1))


if __name__ == "__main__":
    main()
