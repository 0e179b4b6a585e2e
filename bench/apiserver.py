"""API server benchmark: writes per second, and watch delivery latency with 50 watchers.

Goals (issue #2, this 2-core machine): >= 2,000 writes/s; p99 delivery <= 20 ms.

    python -m bench.apiserver [--writes 6000] [--watchers 50] [--rate 500]

Writes: concurrent EndpointSlice creates, then updates of the same objects,
from one client process, with no watcher and with 50 watchers attached (each
write is delivered to every watcher). Latency: a writer paced at --rate writes
objects stamped with their send time; 50 watchers in another process record
when each event arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time

from testbed.api.v1 import api_pb2 as pb
from bench.common import RESULTS, apiserver_process, client_for, percentile, print_table


def endpoint_slice(i: int, stamp: float = 0.0) -> pb.EndpointSlice:
    eps = pb.EndpointSlice(address_type="IPv4")
    eps.metadata.name = f"bench-{i}"
    eps.metadata.namespace = "bench"
    eps.metadata.labels["kubernetes.io/service-name"] = f"svc-{i % 100}"
    if stamp:
        eps.metadata.annotations["sent"] = repr(stamp)
    eps.ports.add(name="http", protocol="TCP", port=8080)
    for k in range(5):
        ep = eps.endpoints.add(addresses=[f"10.244.{k}.{i % 250 + 1}"], node_name=f"node-{k}")
        ep.conditions.ready = True
    return eps


async def write_burst(state, count: int, concurrency: int, update: bool) -> float:
    async with client_for(state) as client:
        queue = list(range(count))

        async def worker():
            while queue:
                i = queue.pop()
                obj = endpoint_slice(i)
                if update:
                    obj.endpoints[0].conditions.ready = False
                    await client.update(obj)
                else:
                    await client.create(obj)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


def watchers_process(address: str, watchers: int, expect: int, ready, out) -> None:
    """Runs in its own process: `watchers` streams, each recording arrival - send time."""
    from testbed.client.client import ApiClient

    async def main():
        async with ApiClient(address) as client:
            latencies: list[float] = []
            started = 0  # watchers past their initial state

            async def one():
                nonlocal started
                seen, primed = 0, False
                stream = client.watch(kind="EndpointSlice", namespace="bench", resource_version="")
                async for item in stream:
                    if item.type == "BOOKMARK":
                        if not primed:
                            primed = True
                            started += 1
                            if started == watchers:
                                ready.set()
                        continue
                    sent = item.obj.metadata.annotations.get("sent")
                    if sent:
                        latencies.append(time.time() - float(sent))
                    seen += 1
                    if seen == expect:
                        return

            await asyncio.gather(*(one() for _ in range(watchers)))
            out.put(latencies)

    asyncio.run(main())


async def paced_writes(state, count: int, rate: float, offset: int) -> None:
    async with client_for(state) as client:
        start = time.perf_counter()
        for n in range(count):
            target = start + n / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await client.create(endpoint_slice(offset + n, stamp=time.time()))


def run_watchers(state, watchers: int, count: int, fn):
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=watchers_process, args=(state.api_address, watchers, count, ready, out))
    proc.start()
    if not ready.wait(30):
        proc.terminate()
        raise RuntimeError("watchers did not start")
    fn()
    latencies = out.get(timeout=120)
    proc.join(30)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writes", type=int, default=6000)
    parser.add_argument("--watchers", type=int, default=50)
    parser.add_argument("--rates", default="100,200,500", help="paced writes/s for the latency runs")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    args = parser.parse_args()

    rows, record = [], {}
    with apiserver_process() as state:
        creates = asyncio.run(write_burst(state, args.writes, 32, update=False))
        updates = asyncio.run(write_burst(state, args.writes, 32, update=True))
    rows.append(["creates, no watcher", f"{creates:,.0f}"])
    rows.append(["updates, no watcher", f"{updates:,.0f}"])
    record.update(creates_per_s=creates, updates_per_s=updates)

    with apiserver_process() as state:
        fanout: dict[str, float] = {}
        lat = run_watchers(state, args.watchers, args.writes,
                           lambda: fanout.setdefault("rate", asyncio.run(write_burst(state, args.writes, 32, False))))
    rows.append([f"creates, {args.watchers} watchers", f"{fanout['rate']:,.0f}"])
    record["creates_per_s_with_watchers"] = fanout["rate"]
    print_table("API server writes per second (goal >= 2,000)", ["workload", "writes/s"], rows)

    latency_rows, record["latency_ms"] = [], {}
    for rate in (float(r) for r in args.rates.split(",")):
        count = int(rate * args.latency_seconds)
        with apiserver_process() as state:
            lat = run_watchers(state, args.watchers, count,
                               lambda: asyncio.run(paced_writes(state, count, rate, 10**6)))
        ms = [x * 1000 for x in lat]
        p50, p99 = percentile(ms, 50), percentile(ms, 99)
        latency_rows.append([f"{rate:.0f}", f"{len(ms):,}", f"{p50:.2f}", f"{percentile(ms, 90):.2f}",
                             f"{p99:.2f}", f"{max(ms):.2f}"])
        record["latency_ms"][f"{rate:.0f}"] = {"p50": p50, "p99": p99, "max": max(ms)}
    print_table(
        f"Watch delivery latency with {args.watchers} watchers (goal p99 <= 20 ms)",
        ["writes/s", "deliveries", "p50 ms", "p90 ms", "p99 ms", "max ms"],
        latency_rows,
    )
    record["watchers"] = args.watchers
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "apiserver.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
