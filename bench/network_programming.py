"""Pod deleted -> every node's kube-proxy rules no longer send to it, across 20 nodes.

    PYTHONPATH=. python -m bench.network_programming [--nodes 20] [--deletions 20] [--modes iptables,nftables]

Goal (kube-proxy issue): p99 <= 300 ms across 20 nodes (upstream's default min-sync-period
alone is 1 s). kube-proxy runs with its default min-sync-period (1 s): deletions are 7 s
apart, so each one finds the runners idle, as isolated changes do in a real cluster.

Per mode, a cluster of --nodes nodes runs 2 bare pods per node (no controller: nothing
replaces them) behind one ClusterIP Service. Their command ignores SIGTERM, so a deleted pod
stays terminating until the kubelet kills it 5 s later: its second slice update (endpoint
removed) falls between two measurement windows, and each window holds exactly one change
per node. For each deletion the benchmark records:
- t0, just before its `delete` call;
- the EndpointSlice update that marks the pod terminating (ready false, so every kube-proxy
  stops using it), from a watch: its last-change-trigger-time annotation is when the
  EndpointSlice controller saw the deletion, so "controller" = trigger - t0;
- every node's kubeproxy_network_programming_duration_seconds histogram (trigger -> that
  node's rules applied), read from all nodes 0.5 s before and 1 s after the deletion. A
  node's latency for the deletion is the upper bound of the bucket that gained its sample
  (conservative: a histogram keeps no exact values).
End to end per node and deletion = controller + node; the table gives p50/p99 over all
(deletions x nodes) values. Every cluster is named bnp*, lives under a temporary --state-root
and is torn down whatever happens (checked: nothing left).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.cluster import svclab, teardown, up
from bench.common import RESULTS, percentile, print_table
from testbed.api.meta import LAST_CHANGE_TRIGGER_TIME, parse_rfc3339
from testbed.client.client import ApiClient
from testbed.paths import StateDir

GOAL_P99_MS = 300.0
SPACING = 7.0  # seconds between deletions
METRIC = "kubeproxy_network_programming_duration_seconds"

# Runs inside node1: every node's histogram buckets, {node ip: {le: cumulative count}}.
SCRAPE = """
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
out = {}
for ip in sys.argv[1:]:
    text = urllib.request.urlopen(f"http://{ip}:10249/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "kubeproxy_network_programming_duration_seconds":
            out[ip] = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
print(json.dumps(out))
"""


def manifest(nodes: int) -> str:
    pods = []
    for i in range(2 * nodes):
        pods.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: web-{i}, labels: {{app: web}}}}
spec:
  containers: [{{name: web, image: busybox, command: [sh, -c, "trap '' TERM; exec sleep 3600"]}}]
""")
    service = """apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"""
    return "---\n".join(pods + [service])


def scrape(root: Path, name: str, node_ips: list[str]) -> dict[str, dict[str, float]]:
    r = svclab(root, name, "exec", "node1", "--", sys.executable, "-c", SCRAPE, *node_ips, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"scraping metrics failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def node_latency_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Upper bound (ms) of the highest bucket that gained a sample; None if none did."""
    bounds = sorted((float(le), le) for le in after if le != "+Inf")
    gained = None
    previous_before = previous_after = 0.0
    for bound, le in bounds + [(float("inf"), "+Inf")]:
        new = (after.get(le, 0.0) - previous_after) - (before.get(le, 0.0) - previous_before)
        previous_before, previous_after = before.get(le, 0.0), after.get(le, 0.0)
        if new > 0:
            gained = bound
    return None if gained is None else gained * 1000


async def terminating_seen(client: ApiClient, ip: str, revision: str, timeout: float) -> tuple[float, float]:
    """(when the watch delivered the slice marking `ip` not ready, its trigger time)."""
    deadline = time.monotonic() + timeout
    async for item in client.watch("EndpointSlice", "default", revision,
                                   label_selector="kubernetes.io/service-name=web"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no slice update for {ip}")
        if item.obj is None or item.type == "BOOKMARK":
            continue
        for ep in item.obj.endpoints:
            if ip in ep.addresses and not ep.conditions.ready:
                trigger = parse_rfc3339(item.obj.metadata.annotations.get(LAST_CHANGE_TRIGGER_TIME, ""))
                return time.time(), trigger if trigger is not None else float("nan")
    raise TimeoutError(f"watch ended before {ip} left")


async def wait_ready(client: ApiClient, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        slices, _ = await client.list("EndpointSlice", "default", label_selector="kubernetes.io/service-name=web")
        if sum(1 for s in slices for e in s.endpoints if e.conditions.ready) >= count:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("pods did not get Ready")


def bench_mode(mode: str, nodes: int, deletions: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="svclab-bnp-"))
    name = f"bnp{mode[0]}{os.getpid() % 1000}"
    path = root / "web.yaml"
    path.write_text(manifest(nodes))
    rows: list[dict] = []
    try:
        up_s, _ = up(root, name, nodes, path, "--proxy-mode", mode)
        print(f"  {mode}: {nodes} nodes up in {up_s:.1f} s", file=sys.stderr, flush=True)
        state = StateDir(root / name)

        async def run() -> None:
            async with ApiClient.for_state_dir(state) as client:
                await wait_ready(client, 2 * nodes, 60)
                node_objs, _ = await client.list("Node")
                node_ips = [a.address for n in node_objs for a in n.status.addresses if a.type == "InternalIP"]
                await asyncio.sleep(2)  # the last syncs of the start settle
                started = time.time() + 1
                for k in range(deletions):
                    pods, revision = await client.list("Pod", "default")
                    victim = next(p for p in sorted(pods, key=lambda p: p.metadata.name)
                                  if p.status.pod_ip and not p.metadata.deletion_timestamp)
                    before = await asyncio.to_thread(scrape, root, name, node_ips)
                    await asyncio.sleep(max(0.0, started + SPACING * k - time.time()))
                    t0 = time.time()
                    seen = asyncio.create_task(terminating_seen(client, victim.status.pod_ip, revision, 10))
                    await client.delete("Pod", victim.metadata.name, "default")
                    slice_at, trigger = await seen
                    await asyncio.sleep(max(0.0, t0 + 1.0 - time.time()))
                    after = await asyncio.to_thread(scrape, root, name, node_ips)
                    per_node = {ip: node_latency_ms(before.get(ip, {}), after.get(ip, {})) for ip in node_ips}
                    rows.append({"pod": victim.metadata.name, "controller_ms": (trigger - t0) * 1000,
                                 "slice_seen_ms": (slice_at - t0) * 1000, "nodes_ms": per_node})
                    missing = [ip for ip, v in per_node.items() if v is None]
                    worst = max((v for v in per_node.values() if v is not None), default=float("nan"))
                    print(f"  {mode} deletion {k + 1}: controller {(trigger - t0) * 1000:.0f} ms, "
                          f"slowest node <= {worst:.0f} ms" + (f", no sample from {missing}" if missing else ""),
                          file=sys.stderr, flush=True)
                    await asyncio.sleep(max(0.0, t0 + SPACING - 0.5 - time.time()))

        asyncio.run(run())
    finally:
        teardown(root, name)
    return summarize(mode, nodes, rows)


def summarize(mode: str, nodes: int, rows: list[dict]) -> dict:
    controller = [r["controller_ms"] for r in rows]
    node = [v for r in rows for v in r["nodes_ms"].values() if v is not None]
    total = [r["controller_ms"] + v for r in rows for v in r["nodes_ms"].values() if v is not None]
    missing = sum(1 for r in rows for v in r["nodes_ms"].values() if v is None)
    return {"mode": mode, "nodes": nodes, "deletions": len(rows), "rows": rows, "missing": missing,
            "controller_p50": percentile(controller, 50), "controller_p99": percentile(controller, 99),
            "node_p50": percentile(node, 50), "node_p99": percentile(node, 99),
            "total_p50": percentile(total, 50), "total_p99": percentile(total, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--deletions", type=int, default=20)
    parser.add_argument("--modes", default="iptables,nftables")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()
    results = [bench_mode(mode, args.nodes, args.deletions) for mode in args.modes.split(",") if mode]
    table = print_table(
        f"\nPod deleted -> every node's rules stop sending to it ({args.nodes} nodes, {args.deletions} deletions "
        f"{SPACING:.0f} s apart, min-sync-period 1 s; goal p99 <= {GOAL_P99_MS:.0f} ms)",
        ["mode", "delete -> slice trigger p50/p99 ms", "trigger -> node rules p50/p99 ms (upper bounds)",
         "end to end p50/p99 ms", "samples", "goal"],
        [[r["mode"], f"{r['controller_p50']:.0f} / {r['controller_p99']:.0f}",
          f"{r['node_p50']:.0f} / {r['node_p99']:.0f}", f"{r['total_p50']:.0f} / {r['total_p99']:.0f}",
          f"{r['deletions']} x {r['nodes']}" + (f" ({r['missing']} missing)" if r["missing"] else ""),
          "met" if r["total_p99"] <= GOAL_P99_MS and not r["missing"] else "MISSED"] for r in results])
    print(f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPUs)")
    if not args.no_record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results, "table": table}
        (RESULTS / "network_programming.json").write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {RESULTS / 'network_programming.json'}")


if __name__ == "__main__":
    main()
