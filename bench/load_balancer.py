"""Cloud load balancer benchmark: node-crash failover, rolling pod churn and the new-connection rate.

Goals (load balancer issue):

1. Failover at the defaults (health checks every 0.5 s, 0.4 s timeout, 2 failures):
   a node crashes while a client opens 20 new connections/s (each bounded by 1 s) to
   the external IP. Measured: crash -> the node is out of the table (detection), crash ->
   first successful new connection after the last failed one (the failover window; 0
   when none failed), failed requests in the run. Goal: window <= 2 s. Anchor: MetalLB
   L2 mode "within a few seconds", with user reports of minutes.
2. Rolling pod churn behind a Cluster-policy LoadBalancer Service: every pod replaced one
   by one (a rolling update; new pods take traffic once ready) under the same 20
   requests/s. Goal: 0 failed requests. The pods drain as zero-downtime rollouts do in
   Kubernetes: a `preStop: {sleep: {seconds: 2}}` keeps a deleted pod serving while every
   node's kube-proxy takes it out of its rules (a deleted pod is no longer ready at once,
   but the rules follow within kube-proxy's sync, up to its 1 s min-sync-period). Without
   it, a pod that stops at once loses the requests already sent its way (run once with
   --no-prestop to see how many: it was 13-14 of 240).

3. New-connection rate through the external IP against straight to a NodePort, in the
   same run on the same pods: 20 clients (processes in the client namespace) each open
   500 new connections one after another (bench/connrate.py), rounds alternating
   NodePort / external IP. Goal: rate >= 0.8x the NodePort's, p99 <= 2x, no failed
   connection. The NodePort baseline is a NodePort Service of its own over the same
   pods, its clients spread over the three nodes as the load balancer spreads its
   connections. Also counted: the new connections the switch's select group handed out
   (must equal the connections made) and packet-ins at the app (must be 0).

    PYTHONPATH=. python -m bench.load_balancer [--runs 3] [--quick] [--cases failover,churn,rate]

The crash takes the node's port on the nodes bridge down (the machine drops off the
network; its kubelet keeps reporting, so its pods stay in the endpoints): the crashed
node runs no pod of the measured Service, so the window is the load balancer's alone,
not kube-proxy's. The cluster (3 nodes, default settings) is named bl*, lives under a
temporary --state-root and is torn down whatever happens.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cluster import svclab, teardown
from bench.common import REPO, RESULTS, print_table
from controller import flows
from testbed import naming
from testbed.cloud.lb_table import Port
from testbed.cluster import cloud_lb
from testbed.scenario import assertions
from testbed.scenario.records import Window
from testbed.scenario.traffic import Generator, GeneratorSpec

NODES = {"node1": "172.18.0.2", "node2": "172.18.0.3", "node3": "172.18.0.4"}
RATE = 20.0
REQUEST_TIMEOUT = 1.0
GOAL_WINDOW_S = 2.0
RATE_CLIENTS, RATE_CONNECTIONS, RATE_ROUNDS = 20, 500, 2
GOAL_RATE_RATIO, GOAL_P99_RATIO = 0.8, 2.0


def deployment(name: str, replicas: int, revision: str = "1", pre_stop: int = 0) -> str:
    lifecycle = f", lifecycle: {{preStop: {{sleep: {{seconds: {pre_stop}}}}}}}" if pre_stop else ""
    return f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}, revision: "{revision}"}}}}
    spec: {{containers: [{{name: web, image: nginx, ports: [{{containerPort: 8080}}]{lifecycle}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  type: LoadBalancer
  selector: {{app: {name}}}
  ports: [{{port: 80, targetPort: 8080}}]
"""


class Lab:
    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name
        self.state = root / name

    def run(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        proc = subprocess.run([sys.executable, "-m", "testbed", "--state-root", str(self.root), "--name", self.name,
                               *args], input=input, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"svclab {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def apply(self, manifest: str) -> None:
        self.run("apply", "-f", "-", input=manifest)

    def json(self, *args: str) -> dict:
        return json.loads(self.run("get", *args, "-o", "json"))

    def external_ip(self, service: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ingress = self.json("svc", service).get("status", {}).get("loadBalancer", {}).get("ingress", [])
            if ingress:
                return ingress[0]["ip"]
            time.sleep(0.1)
        raise RuntimeError(f"{service}: no external IP")

    def backends(self, ip: str) -> set[str]:
        lb = cloud_lb.published_table(self.state).by_ip().get(ip)
        return set(lb.backends) if lb else set()

    def wait_backends(self, ip: str, want: set[str], timeout: float = 30) -> float:
        t0 = time.monotonic()
        while self.backends(ip) != want:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{ip}: backends {self.backends(ip)}, want {want}")
            time.sleep(0.02)
        return time.monotonic() - t0

    def cordon(self, node: str, flag: bool) -> None:
        import asyncio

        from testbed.client.client import ApiClient
        from testbed.paths import StateDir

        async def change() -> None:
            async with ApiClient.for_state_dir(StateDir(self.state)) as client:
                obj = await client.get("Node", node)
                obj.spec.unschedulable = flag
                await client.update(obj)
        asyncio.run(change())

    def pods_ready(self, app: str, count: int, revision: str | None = None, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pods = [p for p in self.json("pods", "-l", f"app={app}")["items"]
                    if not p["metadata"].get("deletionTimestamp")]
            ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                            for c in p["status"].get("conditions", []))
                     and (revision is None or p["metadata"]["labels"].get("revision") == revision)]
            if len(ready) == count == len(pods):
                return ready
            time.sleep(0.2)
        raise RuntimeError(f"{app}: pods not ready")

    def load(self, url: str, duration: float) -> Generator:
        """RATE new connections/s from the client to url (a scenario traffic generator), started now."""
        spec = GeneratorSpec("load", naming.node_netns(self.name, "client"), url, rate=RATE, stop=duration,
                             timeout=REQUEST_TIMEOUT, source="client")
        generator = Generator(spec, time.monotonic() + 0.2, Path(tempfile.mkdtemp(prefix="load-", dir=self.root)))
        generator.start()
        generator.wait_ready()
        return generator


def failover_run(lab: Lab, ip: str) -> dict:
    lab.wait_backends(ip, set(NODES.values()))
    run = lab.load(f"http://{ip}/", duration=6)
    time.sleep(2.0)
    crash = time.monotonic() - run.t0
    cloud_lb.node_port_state(lab.name, "node3", "down")
    try:
        detected = lab.wait_backends(ip, {NODES["node1"], NODES["node2"]}, timeout=10)
        run.wait()
    finally:
        cloud_lb.node_port_state(lab.name, "node3", "up")
    requests = run.records()
    failed = [r for r in requests if not r.ok]
    # the scenario assertion's measure: crash -> first success after the last failure (0 when none failed)
    failover = assertions.failover_within("failover", "load", requests, Window(crash, run.spec.stop), GOAL_WINDOW_S)
    window = failover.value if failover.value is not None else float("inf")
    readded = lab.wait_backends(ip, set(NODES.values()), timeout=30)
    return {"detected_s": detected, "window_s": window, "failed": len(failed), "requests": len(requests),
            "failed_before_crash": sum(1 for r in failed if r.t < crash), "readded_s": readded}


def bench_failover(lab: Lab, runs: int) -> dict:
    lab.cordon("node3", True)
    try:
        lab.apply(deployment("ha", 2))
        lab.pods_ready("ha", 2)
    finally:
        lab.cordon("node3", False)
    ip = lab.external_ip("ha")
    results = [failover_run(lab, ip) for _ in range(runs)]
    rows = [[i + 1, f"{r['detected_s']:.2f}", f"{r['window_s']:.2f}", f"{r['failed']} / {r['requests']}",
             f"{r['readded_s']:.2f}"] for i, r in enumerate(results)]
    print_table(f"\n### Node crash under {RATE:.0f} new connections/s (request timeout {REQUEST_TIMEOUT:.0f} s; "
                f"goal: window <= {GOAL_WINDOW_S:.0f} s)",
                ["run", "crash -> out of table s", "failover window s", "failed / requests", "revived -> back s"],
                rows)
    return {"runs": results}


def churn_run(lab: Lab, url: str, revision: str, pre_stop: int) -> dict:
    run = lab.load(url, duration=12)
    time.sleep(1.0)
    t0 = time.monotonic()
    lab.apply(deployment("churn", 3, revision, pre_stop))  # a new template: a rolling update, pods replaced one by one
    lab.pods_ready("churn", 3, revision, timeout=60)
    rollout = time.monotonic() - t0
    run.wait()
    requests = run.records()
    failed = [r for r in requests if not r.ok]
    return {"url": url, "rollout_s": rollout, "requests": len(requests), "failed": len(failed),
            "failures": [(r.t, r.outcome, r.error) for r in failed], "pods": len({r.pod for r in requests if r.ok})}


def bench_churn(lab: Lab, pre_stop: int) -> dict:
    """The same rolling update through the load balancer and, for comparison, straight to node1's NodePort."""
    lab.apply(deployment("churn", 3, "1", pre_stop) + "---\n" + node_port_service("churn-np", "churn"))
    lab.pods_ready("churn", 3, "1")
    ip = lab.external_ip("churn")
    lab.wait_backends(ip, set(NODES.values()))
    # a NodePort Service of its own (see docs/load-balancer.md, "Known limit")
    node_port = lab.json("svc", "churn-np")["spec"]["ports"][0]["nodePort"]
    runs = [churn_run(lab, f"http://{ip}/", "2", pre_stop),
            churn_run(lab, f"http://{NODES['node1']}:{node_port}/", "3", pre_stop)]
    drain = f"preStop sleep {pre_stop} s" if pre_stop else "no preStop"
    print_table(f"\n### Rolling update of 3 pods ({drain}) behind a Cluster-policy LoadBalancer Service, "
                f"{RATE:.0f} requests/s (goal: 0 failed)", ["path", "rollout s", "requests", "failed", "pods that answered"],
                [[label, f"{r['rollout_s']:.1f}", r["requests"], r["failed"], r["pods"]]
                 for label, r in zip(("load balancer -> NodePort", "NodePort directly (no load balancer)"), runs)])
    for r in runs:
        if r["failures"]:
            print(f"failed via {r['url']} (s after start, error):", r["failures"])
    return {"via_load_balancer": runs[0], "via_node_port": runs[1]}


def node_port_service(name: str, app: str) -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  type: NodePort
  selector: {{app: {app}}}
  ports: [{{port: 80, targetPort: 8080}}]
"""


def connrate(lab: Lab, targets: list[str], clients: int, connections: int) -> dict:
    proc = subprocess.run(["ip", "netns", "exec", f"{lab.name}-client", sys.executable, "-m", "bench.connrate",
                           *targets, "--clients", str(clients), "--connections", str(connections), "--timeout", "3"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"connrate: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def packet_ins(lab: Lab) -> int:
    return len(re.findall("unexpected packet-in", (lab.state / "logs" / "lb-controller.log").read_text()))


def bench_rate(lab: Lab, clients: int, connections: int, rounds: int) -> dict:
    """Rounds alternate NodePort / external IP, so the machine's other load hits both alike."""
    lab.apply(deployment("rate", 3) + "---\n" + node_port_service("rate-np", "rate"))
    lab.pods_ready("rate", 3)
    ip = lab.external_ip("rate")
    lab.wait_backends(ip, set(NODES.values()))
    node_port = lab.json("svc", "rate-np")["spec"]["ports"][0]["nodePort"]
    gid = flows.group_id(ip, Port("TCP", 80, 0))
    bridge = f"{lab.name}-edge"
    paths = {"node_port": [f"{n}:{node_port}" for n in NODES.values()], "external_ip": [f"{ip}:80"]}
    runs: dict[str, list[dict]] = {"node_port": [], "external_ip": []}
    before, punted = sum(cloud_lb.group_new_connections(bridge, gid).values()), packet_ins(lab)
    for _ in range(rounds):
        for path, targets in paths.items():
            runs[path].append(connrate(lab, targets, clients, connections))
    grouped = sum(cloud_lb.group_new_connections(bridge, gid).values()) - before
    summary = {path: _combine(r) for path, r in runs.items()}
    np_, lb = summary["node_port"], summary["external_ip"]
    ratios = {"rate": lb["rate"] / np_["rate"], "p50": lb["p50_ms"] / np_["p50_ms"], "p99": lb["p99_ms"] / np_["p99_ms"]}
    made = sum(r["answered"] + r["failed"] for r in runs["external_ip"])
    rows = [[label, f"{x['rate']:.0f}", f"{x['p50_ms']:.1f}", f"{x['p99_ms']:.1f}", f"{x['failed']} / {x['total']}"]
            for label, x in (("straight to a NodePort", np_), ("through the external IP", lb))]
    rows.append(["external IP / NodePort", f"{ratios['rate']:.2f}x", f"{ratios['p50']:.2f}x", f"{ratios['p99']:.2f}x", ""])
    print_table(f"\n### New connections, {clients} clients x {connections} each, {rounds} rounds per path "
                f"(goal: rate >= {GOAL_RATE_RATIO}x, p99 <= {GOAL_P99_RATIO:.0f}x, 0 failed)",
                ["path", "connections/s", "p50 ms", "p99 ms", "failed / connections"], rows)
    print(f"new connections handed out by the switch's group: {grouped} of {made} made; "
          f"packet-ins at the app: {packet_ins(lab) - punted}")
    return {"node_port": runs["node_port"], "external_ip": runs["external_ip"], "summary": summary,
            "ratios": ratios, "group_connections": grouped, "connections_made": made,
            "packet_ins": packet_ins(lab) - punted}


def _combine(runs: list[dict]) -> dict:
    """Rounds of one path: rate over all of them; p50/p99 the mean of the rounds' (each over 10k connections)."""
    answered, seconds = sum(r["answered"] for r in runs), sum(r["seconds"] for r in runs)
    return {"rate": answered / seconds, "p50_ms": sum(r["p50_ms"] for r in runs) / len(runs),
            "p99_ms": sum(r["p99_ms"] for r in runs) / len(runs), "failed": sum(r["failed"] for r in runs),
            "total": sum(r["answered"] + r["failed"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="node crashes")
    parser.add_argument("--quick", action="store_true", help="one crash")
    parser.add_argument("--no-prestop", action="store_true", help="churn with pods that stop at once")
    parser.add_argument("--cases", default="failover,churn,rate", help="which of failover, churn, rate")
    parser.add_argument("--clients", type=int, default=RATE_CLIENTS, help="rate: client processes")
    parser.add_argument("--connections", type=int, default=RATE_CONNECTIONS, help="rate: per client per round")
    parser.add_argument("--rounds", type=int, default=RATE_ROUNDS, help="rate: rounds per path")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    name = "bl" + "".join(random.choices(string.ascii_lowercase, k=4))
    with tempfile.TemporaryDirectory(prefix="svclab-bench-lb-") as tmp:
        root = Path(tmp)
        lab = Lab(root, name)
        try:
            proc = svclab(root, name, "up", "--detach", "--nodes", "3", timeout=240)
            if proc.returncode != 0:
                raise RuntimeError(f"svclab up failed:\n{proc.stderr[-3000:]}")
            results = {}
            if "rate" in cases:
                results["rate"] = bench_rate(lab, args.clients, args.connections, 1 if args.quick else args.rounds)
            if "failover" in cases:
                results["failover"] = bench_failover(lab, 1 if args.quick else args.runs)
            if "churn" in cases:
                results["churn"] = bench_churn(lab, 0 if args.no_prestop else 2)
        finally:
            teardown(root, name)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load_balancer.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"\nwritten: {RESULTS / 'load_balancer.json'}")


if __name__ == "__main__":
    main()
