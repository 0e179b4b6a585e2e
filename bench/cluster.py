"""Cluster runtime benchmark: `svclab up` to serving, and 1,000 pods on 20 nodes.

Goals (runtime issue, this 2-core machine):

1. `svclab up --detach` with 3 nodes and 10 pods (a Deployment of 10 built-in
   servers, plus the 2 cluster-DNS pods) to serving: <= 5 s, median of 3 runs.
   Published one-node anchors: kind 33 s, k3d 20 s, minikube 50 s.
   In each of those clusters, one pod deleted (API call) -> its network namespace and
   /etc/netns directory gone: <= 1 s, median (tests/test_cluster.py only checks they go).
2. 20 nodes x 50 pods (a Deployment of 1,000 replicas applied once the cluster
   is up): apply -> all Ready <= 30 s; memory of every process of the cluster
   (PSS from /proc/<pid>/smaps_rollup) when all are Ready <= 3 GiB; per-pod
   create -> Ready p50 <= 200 ms.

    PYTHONPATH=. python -m bench.cluster [--quick] [--runs 3] [--nodes 20 --pods-per-node 50]

--quick: item 1 and a 5 nodes x 40 pods variant of item 2.

Per-pod latency: the benchmark watches pods (client library, from the
revision before the apply) and records, per pod, when its ADDED event arrived,
when it was first seen bound to a node, first seen with a pod IP, and when its
Ready condition first became True; create -> Ready is Ready minus ADDED (both
by this process's clock; creationTimestamp has only 1 s resolution).

Every cluster is named bn*, lives under a temporary --state-root, and is torn
down (`down`, then `clean`) whatever happens; the run fails if any of its
namespaces or bridges is left.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

from bench.common import REPO, RESULTS, percentile, print_table
from bench.procstats import (cluster_pids, cpu_by_group, cpu_split_by_group, mem_available_kib, memory_by_group,
                             other_load, read_proc)
from testbed import naming
from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.paths import StateDir

ANCHORS = {"kind": 33.0, "k3d": 20.0, "minikube": 50.0}  # published one-node create times, seconds
GOAL_UP_S = 5.0
GOAL_ALL_READY_S = 30.0
GOAL_MEMORY_GIB = 3.0
GOAL_P50_MS = 200.0
GOAL_POD_GONE_S = 1.0
UP_TIMEOUT = 180.0


def deployment_yaml(name: str, replicas: int) -> str:
    return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
        - name: web
          image: svclab/server
          ports:
            - containerPort: 8080
"""


def deployment(name: str, replicas: int) -> pb.Deployment:
    d = pb.Deployment()
    d.metadata.name = name
    d.metadata.namespace = "default"
    d.spec.replicas = replicas
    d.spec.selector.match_labels["app"] = name
    d.spec.template.metadata.labels["app"] = name
    c = d.spec.template.spec.containers.add(name="web", image="svclab/server")
    c.ports.add(container_port=8080, protocol="TCP")
    return d


# ---------------------------------------------------------------- driving svclab


def bench_env(root: Path) -> dict[str, str]:
    """The environment svclab runs with: bytecode cached (in the benchmark's own directory, not
    the repository), as after any first run; PYTHONDONTWRITEBYTECODE would recompile every
    testbed module in each of the cluster's processes at each start."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=str(REPO), PYTHONPYCACHEPREFIX=str(root / "pycache"))
    return env


def warm_up(root: Path) -> None:
    """An untimed 1-node `up` and `down` first: with PYTHONPYCACHEPREFIX every module (standard
    library and site-packages too) is compiled on its first import, as on a first run ever."""
    try:
        up(root, "bnwarm", 1, None)
    finally:
        teardown(root, "bnwarm")


def svclab(root: Path, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = bench_env(root)
    return subprocess.run([sys.executable, "-m", "testbed", "--state-root", str(root), "--name", name, *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def leftovers(name: str) -> list[str]:
    left = [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(name + "-")] \
        if os.path.isdir("/run/netns") else []
    bridges = subprocess.run(["ovs-vsctl", "list-br"], capture_output=True, text=True, timeout=10).stdout.split()
    left += [f"bridge {b}" for b in bridges if b.startswith(name + "-")]
    return left


def teardown(root: Path, name: str) -> None:
    for verb in ("down", "clean"):
        try:
            svclab(root, name, verb, timeout=300)  # a 1,000-pod cluster takes a while to go
        except subprocess.TimeoutExpired:
            print(f"warning: svclab {verb} --name {name} timed out", file=sys.stderr)
    left = leftovers(name)
    if left:
        raise RuntimeError(f"cluster {name} left things behind: {left}")


STEP_RE = re.compile(r"^\s+(.*?)(?::\s+\S+)?\s+\((\d+\.\d+) s\)\s*$")


def up_steps(stderr: str) -> dict[str, float]:
    """The step timings `svclab up` prints on stderr, and its own total."""
    steps = {}
    for line in stderr.splitlines():
        m = STEP_RE.match(line)
        if m:
            steps[m.group(1)] = float(m.group(2))
        m = re.search(r"is up in (\d+\.\d+) s", line)
        if m:
            steps["up (supervisor's own total)"] = float(m.group(1))
    return steps


def up(root: Path, name: str, nodes: int, manifest: Path | None, *extra: str) -> tuple[float, dict[str, float]]:
    args = ["up", "--detach", "--nodes", str(nodes), "--timeout", f"{int(UP_TIMEOUT)}s", *extra]
    if manifest is not None:
        args += ["-f", str(manifest)]
    t0 = time.perf_counter()
    proc = svclab(root, name, *args, timeout=UP_TIMEOUT + 30)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"svclab up --name {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, up_steps(proc.stderr)


async def count_ready(state: StateDir) -> tuple[int, int]:
    async with ApiClient.for_state_dir(state) as client:
        pods, _ = await client.list("Pod", "")
    ready = sum(any(c.type == "Ready" and c.status == "True" for c in p.status.conditions) for p in pods)
    return ready, len(pods)


# ---------------------------------------------------------------- processes and memory


# ---------------------------------------------------------------- item 1


async def pod_teardown_s(state: StateDir, cluster: str, timeout: float = 10.0) -> float:
    """Seconds from the API delete of one pod to its namespace and /etc/netns directory gone."""
    async with ApiClient.for_state_dir(state) as client:
        pods, _ = await client.list("Pod", "default")
        pod = sorted(pods, key=lambda p: p.metadata.name)[0]
        netns = naming.pod_netns(cluster, pod.metadata.uid)
        paths = [naming.NETNS_DIR / netns, Path("/etc/netns") / netns]
        if not all(path.exists() for path in paths):
            raise RuntimeError(f"pod {pod.metadata.name}: no {paths}")
        t0 = time.perf_counter()
        await client.delete("Pod", pod.metadata.name, "default")
        while any(path.exists() for path in paths):
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"pod {pod.metadata.name}: {paths} still there after {timeout} s")
            await asyncio.sleep(0.002)
        return time.perf_counter() - t0


def bench_up(root: Path, runs: int) -> dict:
    manifest = root / "web10.yaml"
    manifest.write_text(deployment_yaml("web", 10))
    results = []
    for i in range(runs):
        name = f"bnup{i}"
        try:
            load = read_proc("/proc/loadavg").split()[0]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall, steps = up(root, name, 3, manifest)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            # CPU of every process up started (they are idle once it returns), plus the
            # `up --detach` command itself: a figure the machine's other load does not change.
            cpu = sum(cpu_by_group(cluster_pids(StateDir(root / name), name)).values())
            cpu += (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            ready, total = asyncio.run(count_ready(StateDir(root / name)))
            gone = asyncio.run(pod_teardown_s(StateDir(root / name), name))
            results.append({"wall_s": wall, "cpu_s": cpu, "loadavg_1m_before": float(load), "steps_s": steps,
                            "pods_ready": ready, "pods": total, "pod_gone_s": gone})
            print(f"  up run {i + 1}: {wall:.2f} s, {cpu:.1f} CPU-s ({ready}/{total} pods Ready; "
                  f"load average {load} before)", file=sys.stderr, flush=True)
        finally:
            teardown(root, name)
    walls = [r["wall_s"] for r in results]
    median = statistics.median(walls)
    rows = [["svclab up --detach, 3 nodes, 10 + 2 DNS pods (median of %d)" % runs, f"{median:.2f} s",
             f"<= {GOAL_UP_S:.0f} s", "met" if median <= GOAL_UP_S else "MISSED"]]
    rows += [["  runs", ", ".join(f"{w:.2f}" for w in walls) + " s", "", ""]]
    rows += [["  CPU time of all its processes (user + system), median",
              f"{statistics.median(r['cpu_s'] for r in results):.1f} CPU-s", "", "2 cores"]]
    rows += [["  machine load average (1 min) before each run",
              ", ".join(f"{r['loadavg_1m_before']:.1f}" for r in results), "", ""]]
    rows += [[f"  anchor: {k} (published, 1 node)", f"{v:.0f} s", "", f"{v / median:.0f}x svclab's time"]
             for k, v in ANCHORS.items()]
    gone = statistics.median(r["pod_gone_s"] for r in results)
    rows += [["pod deleted -> its netns and /etc/netns gone (median)", f"{gone * 1000:.0f} ms",
              f"<= {GOAL_POD_GONE_S:.0f} s", "met" if gone <= GOAL_POD_GONE_S else "MISSED"]]
    print_table("\n### `svclab up` to serving", ["what", "measured", "goal", ""], rows)
    steps = {}
    for r in results:
        for k, v in r["steps_s"].items():
            steps.setdefault(k, []).append(v)
    print_table("\nWhere `up` spends it (medians of the steps `up` prints)", ["step", "s"],
                [[k, f"{statistics.median(v):.2f}"] for k, v in steps.items()]
                + [["python start + detach wrapper + rest (wall - supervisor total)",
                    f"{median - statistics.median(steps.get('up (supervisor' + chr(39) + 's own total)', [0])):.2f}"]])
    return {"runs": results, "median_s": median, "median_cpu_s": statistics.median(r["cpu_s"] for r in results),
            "goal_s": GOAL_UP_S, "anchors_s": ANCHORS, "pod_gone_median_s": gone, "goal_pod_gone_s": GOAL_POD_GONE_S}


# ---------------------------------------------------------------- item 2


async def apply_and_watch(state: StateDir, replicas: int, timeout: float) -> dict:
    """Create the Deployment; per pod, when it was ADDED, bound, given an IP, Ready (monotonic s)."""
    seen: dict[str, dict[str, float]] = {}
    ready_count = 0
    all_ready = asyncio.Event()
    async with ApiClient.for_state_dir(state) as client:
        _, revision = await client.list("Pod", "default", label_selector="app=scale")

        async def watch() -> None:
            nonlocal ready_count
            async for item in client.watch("Pod", "default", revision, label_selector="app=scale"):
                if item.obj is None or item.type in ("BOOKMARK", "DELETED"):
                    continue
                now = time.perf_counter()
                pod = item.obj
                rec = seen.setdefault(pod.metadata.name, {"added": now})
                if pod.spec.node_name and "bound" not in rec:
                    rec["bound"] = now
                if pod.status.pod_ip and "ip" not in rec:
                    rec["ip"] = now
                if "ready" not in rec and any(c.type == "Ready" and c.status == "True"
                                              for c in pod.status.conditions):
                    rec["ready"] = now
                    ready_count += 1
                    if ready_count >= replicas:
                        all_ready.set()

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)  # the watch is open before the apply
        t_apply = time.perf_counter()
        await client.create(deployment("scale", replicas))
        try:
            await asyncio.wait_for(all_ready.wait(), timeout)
            timed_out = False
        except asyncio.TimeoutError:
            timed_out = True
        t_end = time.perf_counter()
        watcher.cancel()
        try:
            await watcher
        except (asyncio.CancelledError, Exception):
            pass
    return {"t_apply": t_apply, "t_end": t_end, "pods": seen, "timed_out": timed_out}


def bare_pod(name: str) -> pb.Pod:
    pod = pb.Pod()
    pod.metadata.name = name
    pod.metadata.namespace = "default"
    pod.metadata.labels["app"] = "paced"
    c = pod.spec.containers.add(name="web", image="svclab/server")
    c.ports.add(container_port=8080, protocol="TCP")
    return pod


async def paced_latency(state: StateDir, count: int, rate: float, timeout: float,
                        make_pod: Callable[[str], pb.Pod] = bare_pod) -> list[float]:
    """Create `count` pods (bare ones unless `make_pod` says) at `rate` per second into the settled
    cluster; create -> Ready (ms) of each. Their label must be app=paced.

    Upstream's pod-startup SLI is measured this way too (latency pods created at a low rate
    next to a saturated cluster), since a burst measures queueing more than a pod's own path.
    """
    seen: dict[str, dict[str, float]] = {}
    done = asyncio.Event()
    async with ApiClient.for_state_dir(state) as client:
        _, revision = await client.list("Pod", "default", label_selector="app=paced")

        async def watch() -> None:
            async for item in client.watch("Pod", "default", revision, label_selector="app=paced"):
                if item.obj is None or item.type in ("BOOKMARK", "DELETED"):
                    continue
                rec = seen.setdefault(item.obj.metadata.name, {"added": time.perf_counter()})
                if "ready" not in rec and any(c.type == "Ready" and c.status == "True"
                                              for c in item.obj.status.conditions):
                    rec["ready"] = time.perf_counter()
                    if sum("ready" in r for r in seen.values()) >= count:
                        done.set()

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        for i in range(count):
            await client.create(make_pod(f"paced-{i}"))
            await asyncio.sleep(1 / rate)
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        watcher.cancel()
        try:
            await watcher
        except (asyncio.CancelledError, Exception):
            pass
    return [(r["ready"] - r["added"]) * 1000 for r in seen.values() if "ready" in r]


def bench_scale(root: Path, nodes: int, per_node: int, timeout: float, paced: int = 40, rate: float = 10) -> dict:
    replicas = nodes * per_node
    run = _scale_run(root, "bnscale", nodes, replicas, timeout, paced, rate)
    times = _pod_times(run.watched, replicas)
    _print_scale(run, times, nodes, per_node, replicas, paced, rate)
    return {
        "nodes": nodes, "pods_per_node": per_node, "replicas": replicas, "up_wall_s": run.up_wall,
        "up_steps_s": run.steps, "down_and_clean_s": run.down_s,
        "timed_out": run.watched["timed_out"], "pods_ready_at_end": run.ready, "pods_at_end": run.total,
        "apply_to_all_ready_s": times["all_ready_s"], "goal_all_ready_s": GOAL_ALL_READY_S,
        "pss_gib": run.pss_gib, "rss_gib": run.rss_gib, "goal_memory_gib": GOAL_MEMORY_GIB,
        # Includes what PSS does not (kernel: namespaces, veths, sockets; OVS) and whatever
        # else the machine did meanwhile: indicative only on a shared machine.
        "machine_mem_available_drop_gib": run.available_drop_gib,
        "create_to_ready_ms": {**_percentiles(times["lat"]), "max": max(times["lat"], default=0)},
        "goal_p50_ms": GOAL_P50_MS,
        "apply_to_ready_ms": _percentiles(times["from_apply"]), "created_to_bound_ms": _percentiles(times["bind"]),
        "bound_to_ip_ms": _percentiles(times["bound_to_ip"]), "ip_to_ready_ms": _percentiles(times["ip_to_ready"]),
        "apply_to_last_created_ms": times["last_created_ms"],
        "paced": {"pods": paced, "per_s": rate, "ready": len(run.paced_lat),
                  "create_to_ready_ms": _percentiles(run.paced_lat)},
        "memory_idle": run.mem_idle, "memory_ready": run.memory,
        "cpu_s_apply_to_ready": {g: {"user": u, "system": k} for g, (u, k) in run.cpu.items()},
    }


class _ScaleRun(NamedTuple):
    """What one scale run measured (up, apply and watch, memory and CPU by group, teardown)."""

    up_wall: float
    steps: dict[str, float]
    watched: dict
    memory: dict[str, dict[str, float]]
    mem_idle: dict[str, dict[str, float]]
    pss_gib: float  # all cluster processes, when all are Ready
    rss_gib: float
    cpu: dict[str, tuple[float, float]]  # (user, system) seconds from the apply to all Ready
    available_drop_gib: float
    ready: int
    total: int
    paced_lat: list[float]
    down_s: float


def _scale_run(root: Path, name: str, nodes: int, replicas: int, timeout: float, paced: int, rate: float) -> _ScaleRun:
    """Up, apply `replicas` pods and watch them become Ready, then paced pods; always torn down."""
    state = StateDir(root / name)
    available_before = mem_available_kib()
    try:
        up_wall, steps = up(root, name, nodes, None)
        print(f"  up with {nodes} nodes: {up_wall:.2f} s; applying {replicas} replicas", file=sys.stderr, flush=True)
        groups = cluster_pids(state, name)
        cpu_before = cpu_split_by_group(groups)
        mem_idle = memory_by_group(groups)
        watched = asyncio.run(apply_and_watch(state, replicas, timeout))
        groups = cluster_pids(state, name)
        memory = memory_by_group(groups)
        available_drop_gib = (available_before - mem_available_kib()) / 2**20
        cpu_after = cpu_split_by_group(groups)
        ready, total = asyncio.run(count_ready(state))
        paced_lat = asyncio.run(paced_latency(state, paced, rate, 60)) if paced and not watched["timed_out"] else []
    finally:
        t_down = time.perf_counter()
        teardown(root, name)
        down_s = time.perf_counter() - t_down
    cpu = {g: (cpu_after[g][0] - cpu_before.get(g, (0, 0))[0], cpu_after[g][1] - cpu_before.get(g, (0, 0))[1])
           for g in cpu_after}
    pss_gib, rss_gib = (sum(g[kind] for g in memory.values()) / 1024 for kind in ("pss_mib", "rss_mib"))
    return _ScaleRun(up_wall, steps, watched, memory, mem_idle, pss_gib, rss_gib, cpu, available_drop_gib, ready,
                     total, paced_lat, down_s)


def _pod_times(watched: dict, replicas: int) -> dict:
    """The burst's per-pod latencies in ms: lat (created, i.e. ADDED, -> Ready), from_apply, bind (created ->
    bound), bound_to_ip, ip_to_ready; all_ready_s (apply -> all Ready, NaN if not all were), last_created_ms."""
    t_apply, pods = watched["t_apply"], watched["pods"]
    readies = [p["ready"] for p in pods.values() if "ready" in p]
    all_ready_s = (max(readies) - t_apply) if len(readies) >= replicas else float("nan")
    lat = [(p["ready"] - p["added"]) * 1000 for p in pods.values() if "ready" in p]
    from_apply = [(p["ready"] - t_apply) * 1000 for p in pods.values() if "ready" in p]
    bind = [(p["bound"] - p["added"]) * 1000 for p in pods.values() if "bound" in p]
    bound_to_ip = [(p["ip"] - p["bound"]) * 1000 for p in pods.values() if "ip" in p and "bound" in p]
    ip_to_ready = [(p["ready"] - p["ip"]) * 1000 for p in pods.values() if "ready" in p and "ip" in p]
    added = sorted(p["added"] for p in pods.values())
    last_created_ms = (added[-1] - t_apply) * 1000 if added else None
    return {"all_ready_s": all_ready_s, "lat": lat, "from_apply": from_apply, "bind": bind, "bound_to_ip": bound_to_ip,
            "ip_to_ready": ip_to_ready, "last_created_ms": last_created_ms}


def _percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99)}


def _p50_p99(values: list[float]) -> str:
    return f"{percentile(values, 50):.0f} / {percentile(values, 99):.0f} ms"


def _print_scale(run: _ScaleRun, times: dict, nodes: int, per_node: int, replicas: int, paced: int,
                 rate: float) -> None:
    memory, pss_gib, rss_gib = run.memory, run.pss_gib, run.rss_gib
    lat, all_ready_s, paced_lat, timed_out = times["lat"], times["all_ready_s"], run.paced_lat, run.watched["timed_out"]
    label = f"{nodes} nodes x {per_node} pods ({replicas} pods)"
    rows = [
        [f"apply -> all {replicas} Ready", f"{all_ready_s:.1f} s" + (" (TIMED OUT)" if timed_out else ""),
         f"<= {GOAL_ALL_READY_S:.0f} s", "met" if all_ready_s <= GOAL_ALL_READY_S else "MISSED"],
        ["memory of all cluster processes, PSS (RSS)", f"{pss_gib:.2f} GiB ({rss_gib:.2f} GiB)",
         f"<= {GOAL_MEMORY_GIB:.0f} GiB", "met" if pss_gib <= GOAL_MEMORY_GIB else "MISSED"],
        ["per-pod create -> Ready p50 (the burst)", f"{percentile(lat, 50):.0f} ms", f"<= {GOAL_P50_MS:.0f} ms",
         "met" if percentile(lat, 50) <= GOAL_P50_MS else "MISSED"],
        ["per-pod create -> Ready p99 (the burst)", f"{percentile(lat, 99):.0f} ms", "", ""],
        ["apply -> pod Ready p50 / p99", _p50_p99(times["from_apply"]), "", ""],
        ["apply -> last pod created (ADDED)",
         f"{times['last_created_ms']:.0f} ms" if times["last_created_ms"] is not None else "-", "", ""],
        ["  created -> bound p50 / p99", _p50_p99(times["bind"]), "", ""],
        ["  bound -> pod IP written p50 / p99", _p50_p99(times["bound_to_ip"]), "", ""],
        ["  pod IP -> Ready p50 / p99", _p50_p99(times["ip_to_ready"]), "", ""],
        [f"`up --detach` with {nodes} nodes, no pods", f"{run.up_wall:.2f} s", "", ""],
        [f"`down` + `clean` with {replicas + paced + 2} pods", f"{run.down_s:.1f} s", "", ""],
        [f"paced: {paced} more pods, ~{rate:.0f}/s, once all are Ready: create -> Ready p50 / p99",
         f"{_p50_p99(paced_lat)} ({len(paced_lat)} Ready)", "", ""],
    ]
    print_table(f"\n### {label}", ["what", "measured", "goal", ""], rows)
    comp_rows = []
    for g in sorted(memory):
        user, system = run.cpu.get(g, (0.0, 0.0))
        comp_rows.append([g, str(memory[g]["processes"]), f"{run.mem_idle.get(g, {}).get('pss_mib', 0):.0f}",
                          f"{memory[g]['pss_mib']:.0f}", f"{memory[g]['rss_mib']:.0f}",
                          f"{user + system:.1f} ({user:.1f} + {system:.1f})"])
    print_table(f"\nPer component ({label}): memory before the apply and when all are Ready; CPU spent from "
                "apply to all Ready", ["component", "processes", "PSS idle MiB", "PSS MiB", "RSS MiB",
                                       "CPU s (user + sys)"], comp_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="item 1 and a 5 nodes x 40 pods scale run")
    parser.add_argument("--runs", type=int, default=3, help="runs of `up` (median)")
    parser.add_argument("--nodes", type=int, default=None)
    parser.add_argument("--pods-per-node", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=300.0, help="apply -> all Ready timeout, seconds")
    parser.add_argument("--skip-up", action="store_true", help="only the scale run")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.cluster needs root (svclab up)")
    nodes = args.nodes or (5 if args.quick else 20)
    per_node = args.pods_per_node or (40 if args.quick else 50)
    results: dict = {"quick": args.quick, "machine": f"{os.cpu_count()} CPUs", "load_at_start": other_load()}
    print(f"# svclab cluster benchmark ({'quick' if args.quick else 'full'}); {results['load_at_start']}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="svclab-bench-cluster-") as tmp:
        root = Path(tmp)
        warm_up(root)
        if not args.skip_up:
            results["up"] = bench_up(root, args.runs)
        results["scale"] = bench_scale(root, nodes, per_node, args.timeout)
    results["load_at_end"] = other_load()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cluster.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"\nwritten: {RESULTS / 'cluster.json'}")


if __name__ == "__main__":
    main()
