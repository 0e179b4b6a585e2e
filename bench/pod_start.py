"""Pod create -> Ready for `command:` pods (each in its sandbox and cgroups) next to built-in pods.

    python -m bench.pod_start [--pods 40] [--rate 5] [--limits] [--record]

One 1-node cluster (named bnstart, under a temporary --state-root, torn down whatever
happens). Pods are created at --rate per second, as bench/cluster.py's paced pods, and
timed from their ADDED event to Ready (the kubelet's readiness probe connects to port 8080):

- built-in: the kubelet's own server (no process), the reference;
- command: `python3 -S -c <accept loop on 8080>` (a process per pod), with --limits also
  resources.limits (cpu 500m, memory 64Mi), so the cgroup limits are written too.

Run it on a tree without the sandbox for the before/after ratio (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from bench.cluster import bare_pod, paced_latency, teardown, up
from bench.common import RESULTS, percentile, print_table
from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.paths import StateDir

LISTENER = ("import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('', 8080))\ns.listen()\nwhile True:\n    s.accept()[0].close()\n")
NAME = "bnstart"


def command_pod(name: str, limits: bool) -> pb.Pod:
    pod = bare_pod(name)
    container = pod.spec.containers[0]
    container.image = "python"
    container.command.extend(["python3", "-S", "-c", LISTENER])
    if limits:
        container.resources.limits.update({"cpu": "500m", "memory": "64Mi"})
    return pod


async def delete_paced(state: StateDir) -> None:
    async with ApiClient.for_state_dir(state) as client:
        pods, _ = await client.list("Pod", "default", label_selector="app=paced")
        for pod in pods:
            await client.delete("Pod", pod.metadata.name, "default", grace_period=0)
        while (await client.list("Pod", "default", label_selector="app=paced"))[0]:
            await asyncio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=40)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--limits", action="store_true", help="command pods with resources.limits")
    parser.add_argument("--record", action="store_true", help="write bench/results/pod_start.json")
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="svclab-bench-") as tmp:
        root = Path(tmp)
        state = StateDir(root / NAME)
        try:
            up(root, NAME, 1, None)
            for kind, make in (("built-in", bare_pod), ("command", lambda n: command_pod(n, args.limits))):
                results[kind] = asyncio.run(paced_latency(state, args.pods, args.rate, 60, make))
                asyncio.run(delete_paced(state))
                print(f"  {kind}: {len(results[kind])}/{args.pods} Ready", file=sys.stderr, flush=True)
        finally:
            teardown(root, NAME)
    rows = [[kind, f"{len(lat)}/{args.pods}", f"{percentile(lat, 50):.0f}", f"{percentile(lat, 99):.0f}"]
            for kind, lat in results.items()]
    print_table(f"pod create -> Ready, {args.pods} pods at {args.rate:g}/s on 1 node"
                + (" (command pods with limits)" if args.limits else ""), ["pods", "Ready", "p50 ms", "p99 ms"], rows)
    if args.record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "pod_start.json").write_text(json.dumps({
            "pods": args.pods, "rate": args.rate, "limits": args.limits,
            "create_to_ready_ms": {k: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)}
                                   for k, v in results.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
