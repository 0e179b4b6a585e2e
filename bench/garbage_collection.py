"""Garbage collection of many dependents: a Deployment of N replicas (no node, so the pods stay
unscheduled), created through the Deployment controller's bursts of 500, then deleted.

    python -m bench.garbage_collection [--dependents 100000]

Reports how long creating and collecting took, the peak resident memory of the
controller-manager while it ran, and whether the controller-manager
was still up at the end (issue #10: it died collecting 100,000 orphans). Not a test: the
tests check that creation stops when the Deployment goes and that GC of 3,000 completes.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import threading
import time

from bench.common import REPO, RESULTS, apiserver_process, client_for, print_table
from testbed.api.kinds import BY_NAME
from testbed.api.kube_json import from_dict


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakMemory:
    """Samples the resident memory of some pids every 0.2 s in a thread; keeps the peaks."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {name: 0.0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mb(pid))

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def deployment(replicas: int):
    message, _ = from_dict({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "many", "namespace": "bench"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "many"}},
                 "template": {"metadata": {"labels": {"app": "many"}},
                              "spec": {"containers": [{"name": "web", "image": "nginx"}]}}},
    }, BY_NAME["Deployment"])
    return message


async def count_pods(client) -> int:
    pods, _ = await client.list("Pod", "bench")
    return len(pods)


async def until(client, predicate, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate(await count_pods(client)):
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise TimeoutError(f"not done in {timeout}s ({await count_pods(client)} pods)")


async def measure(state, dependents: int, timeout: float) -> tuple[float, float]:
    async with client_for(state) as client:
        await client.create(deployment(dependents))
        created = await until(client, lambda n: n >= dependents, timeout)
        await client.delete("Deployment", "many", "bench")
        collected = await until(client, lambda n: n == 0, timeout)
        return created, collected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dependents", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    with apiserver_process() as state:
        cm = subprocess.Popen([sys.executable, "-m", "testbed", "--state-dir", str(state.path), "controller-manager"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        try:
            with PeakMemory({"controller-manager": cm.pid}) as memory:
                created, collected = asyncio.run(measure(state, args.dependents, args.timeout))
            alive = cm.poll() is None
        finally:
            cm.terminate()
            cm.wait(10)
    rows = [[f"{args.dependents:,}", f"{created:.1f}", f"{collected:.1f}",
             f"{args.dependents / collected:,.0f}", f"{memory.peak['controller-manager']:.0f}",
             "yes" if alive else "NO"]]
    text = print_table("Garbage collection of a Deployment's pods (bench/garbage_collection.py)",
                       ["pods", "created in (s)", "collected in (s)", "deletes/s", "controller-manager peak RSS (MB)",
                        "controller-manager alive"], rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "garbage_collection.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
