"""The traffic generator's process: `python -m testbed.scenario.probe CONFIG.json`, run inside the
source's network namespace (traffic.py starts it there with `ip netns exec`).

Open loop: request i is due at t0 + start + i/rate, whether or not earlier ones have
answered (each runs as a task of its own, bounded by the request timeout). Only the
bound on requests in flight can hold a start back; a start later than its due time is a
late start, and requests that could not start before the stop time are never sent, so a
rate the machine cannot keep shows as an achieved rate below the asked one.

Prints `ready` once set up (then, if its config's t0 is null, reads t0 from stdin: the
runner's go once every generator is ready), writes one record per request (records.py) as each ends and
the summary (traffic.GeneratorSummary) at the end: at its stop time, or on SIGTERM, after
what is in flight has ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import resource
import signal
import sys
import time
from dataclasses import asdict
from typing import TextIO

from testbed.scenario.traffic import DRAIN_GRACE_S, GeneratorSpec, GeneratorSummary
from testbed.scenario.wire import Connection, Phase, Target, classify, open_connection

LATE_AFTER_S = 0.010


class Pool:
    """keepalive: `size` persistent connections used round robin; a request waits for a free one.

    A connection that failed (reset, closed, timed out) or that the server closes is dropped
    and the next request on its slot opens a new one."""

    def __init__(self, size: int) -> None:
        self.connections: list[Connection | None] = [None] * size
        self.busy = [False] * size
        self.next = 0
        self.freed = asyncio.Condition()

    async def acquire(self) -> int:
        async with self.freed:
            await self.freed.wait_for(lambda: not all(self.busy))
            size = len(self.busy)
            slot = next(s % size for s in range(self.next, self.next + size) if not self.busy[s % size])
            self.busy[slot], self.next = True, (slot + 1) % size
            return slot

    async def release(self, slot: int, keep: bool) -> None:
        conn = self.connections[slot]
        if not keep and conn is not None:
            conn.close()
            self.connections[slot] = None
        async with self.freed:
            self.busy[slot] = False
            self.freed.notify()

    def close(self) -> None:
        for conn in self.connections:
            if conn is not None:
                conn.close()


class Probe:
    def __init__(self, spec: GeneratorSpec, t0: float, out: TextIO) -> None:
        self.spec, self.t0, self.out = spec, t0, out
        self.target = Target.parse(spec.target, spec.protocol)
        self.pool = Pool(spec.pool) if spec.connections == "keepalive" else None
        self.opened = 0  # connections that opened
        self.attempts = 0  # connections tried: their numbers
        self.inflight = 0
        self.peak_inflight = 0
        self.outcomes: dict[str, int] = {}
        self.stopping = asyncio.Event()
        # the source ports to bind, in turn (traffic.with_source_ports); None: the kernel picks
        self.ports = (itertools.cycle(range(spec.source_ports[0], spec.source_ports[1] + 1))
                      if spec.source_ports else None)

    async def _open(self, phase: Phase) -> Connection:
        self.attempts += 1
        conn = await open_connection(self.target, self.attempts, phase, self.ports)
        self.opened += 1
        return conn

    async def _connection(self, phase: Phase) -> tuple[Connection, int | None]:
        if self.pool is None:
            return await self._open(phase), None
        phase.name = "pool"
        slot = await self.pool.acquire()
        try:
            if self.pool.connections[slot] is None:
                self.pool.connections[slot] = await self._open(phase)
        except BaseException:
            await self.pool.release(slot, keep=False)
            raise
        return self.pool.connections[slot], slot

    async def request(self, started: float) -> None:
        phase, conn, slot, ok = Phase(), None, None, False
        answer, outcome, error = {}, "ok", ""
        try:
            async with asyncio.timeout(self.spec.timeout):
                conn, slot = await self._connection(phase)
                answer = await conn.exchange(self.target, self.pool is not None, phase)
                ok = True
        except Exception as exc:  # every failure is a record; the kind is its outcome
            outcome, error = classify(exc, phase.name)
        finally:
            ended = time.monotonic()
            if slot is not None:
                await self.pool.release(slot, keep=ok and conn.reusable)
            elif conn is not None:
                conn.close()
            self.inflight -= 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.out.write(json.dumps({
            "t": round(started - self.t0, 4), "outcome": outcome, "latency_ms": round((ended - started) * 1000, 2),
            "pod": answer.get("pod", ""), "node": answer.get("node", ""), "client": answer.get("client", ""),
            "source": conn.source if conn else "", "conn": conn.id if conn else 0, "error": error}) + "\n")

    async def _until(self, when: float) -> bool:
        """Sleep until the monotonic time `when`; False if told to stop meanwhile."""
        delay = when - time.monotonic()
        if delay <= 0:
            await asyncio.sleep(0)
        else:
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except TimeoutError:
                pass
        return not self.stopping.is_set()

    async def run(self) -> GeneratorSummary:
        spec, interval = self.spec, 1.0 / self.spec.rate
        late_after = min(LATE_AFTER_S, interval / 2)
        begin, end = self.t0 + spec.start, self.t0 + spec.stop
        tasks: set[asyncio.Task] = set()
        sent = late = 0
        max_lag = 0.0
        for i in range(spec.planned):
            due = begin + i * interval
            if not await self._until(due):
                break
            while self.inflight >= spec.inflight_limit and not self.stopping.is_set() and time.monotonic() < end:
                await asyncio.sleep(0.001)  # the bound on requests in flight holds this start back
            started = time.monotonic()
            if self.stopping.is_set() or started >= end:
                break
            lag = started - due
            late += lag > late_after
            max_lag = max(max_lag, lag)
            sent += 1
            self.inflight += 1
            self.peak_inflight = max(self.peak_inflight, self.inflight)
            task = asyncio.create_task(self.request(started))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        stopped_at = time.monotonic()
        if tasks:
            await asyncio.wait(set(tasks), timeout=spec.timeout + DRAIN_GRACE_S)
        if self.pool is not None:
            self.pool.close()
        early = self.stopping.is_set() and stopped_at < end
        seconds = (min(stopped_at, end) if early else end) - begin
        return GeneratorSummary(
            name=spec.name, asked_rate=spec.rate, planned=spec.planned, sent=sent,
            achieved_rate=round(sent / seconds, 3) if seconds > 0 else 0.0, late_starts=late,
            max_lag_ms=round(max_lag * 1000, 2), outcomes=dict(self.outcomes), connections_opened=self.opened,
            peak_inflight=self.peak_inflight, inflight_limit=spec.inflight_limit, stopped_early=early)


async def _main(config: dict) -> None:
    spec = GeneratorSpec(**config["spec"])
    loop = asyncio.get_running_loop()
    # name lookups run in threads (getaddrinfo, as any client of the namespace's resolver): enough of them
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=min(64, spec.inflight_limit)))
    with open(config["records"], "w", buffering=1) as out:
        print("ready", flush=True)
        t0 = config["t0"]
        if t0 is None:  # the clock starts when the runner says (traffic.Generator.go); EOF: it is gone
            line = sys.stdin.readline()
            if not line.strip():
                return
            t0 = float(line)
        probe = Probe(spec, t0, out)
        loop.add_signal_handler(signal.SIGTERM, probe.stopping.set)
        summary = await probe.run()
    tmp = config["summary"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(summary), f)
    os.replace(tmp, config["summary"])


def main(argv: list[str]) -> None:
    with open(argv[0]) as f:
        config = json.load(f)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # not asyncio.run: its cleanup waits for lookups still stuck in the resolver's threads
    asyncio.new_event_loop().run_until_complete(_main(config))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
