"""Traffic generators: each a probe process (testbed/scenario/probe.py) inside its source's namespace.

A generator is started by pid (`ip netns exec <netns> python -m testbed.scenario.probe
CONFIG`), ends by itself at its stop time (plus one request timeout to finish what is in
flight) and can be stopped earlier by pid (SIGTERM, then SIGKILL). It writes one JSON
line per request to `<dir>/<name>.jsonl` while it runs (records.py reads them, also live)
and a summary to `<dir>/<name>.summary.json` when it ends: the rate asked and the one
achieved, so a rate the machine cannot keep is reported rather than silently lowered.

Times are seconds after the scenario's t0, a CLOCK_MONOTONIC value (time.monotonic()):
that clock is system-wide on Linux, so every probe and the runner share it.

The network namespace of a source: `testbed.naming.node_netns(cluster, "client")` (or a
node: "node1", ...) and `testbed.naming.pod_netns(cluster, pod_uid)` for a pod (`ip netns
exec` binds the pod's /etc/netns/<netns>/resolv.conf, so names resolve through the
cluster DNS); "" runs the probe in the caller's namespace (loopback tests).
"""

from __future__ import annotations

import json
import math
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from testbed.scenario.records import Record, RecordTail, load_records
from testbed.scenario.wire import PROTOCOLS, Target

CONNECTIONS = ("new", "keepalive")
MAX_INFLIGHT = 2000
DRAIN_GRACE_S = 1.0  # after the last request's timeout
EPHEMERAL_PORTS = (32768, 60999)  # Linux's default net.ipv4.ip_local_port_range


@dataclass(frozen=True)
class GeneratorSpec:
    """One generator. `target` has its addresses resolved already (a DNS name stays a name)."""

    name: str
    netns: str  # where it runs; "" = the caller's namespace
    target: str  # http://host[:port]/path, or host:port with protocol tcp or udp
    rate: float  # requests per second, open loop
    stop: float  # s after t0: no request starts at or after it
    start: float = 0.0  # s after t0
    protocol: str = "http"  # http | tcp | udp
    connections: str = "new"  # new: a connection (socket) per request; keepalive: `pool` reused ones
    timeout: float = 1.0  # per request, s: resolve + connect + answer
    pool: int = 1  # keepalive: persistent connections, used round robin
    max_inflight: int = 0  # bound on requests in flight; 0: enough for rate x timeout
    source: str = ""  # as the scenario names it (client, node1, pod:web-7c9f-x2kqp): for reports
    source_ports: tuple[int, int] | None = None  # (first, last) to bind, in turn; None: the kernel picks

    def __post_init__(self) -> None:
        if self.source_ports is not None:  # a list, read back from JSON
            object.__setattr__(self, "source_ports", tuple(self.source_ports))
        problems = []
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol {self.protocol!r}: use one of {', '.join(PROTOCOLS)}")
        if self.connections not in CONNECTIONS:
            problems.append(f"connections {self.connections!r}: use new or keepalive")
        if not self.rate > 0 or not math.isfinite(self.rate):
            problems.append(f"rate {self.rate!r}: must be > 0")
        if not self.timeout > 0:
            problems.append(f"timeout {self.timeout!r}: must be > 0")
        if not self.stop > self.start >= 0:
            problems.append(f"start {self.start!r} / stop {self.stop!r}: need 0 <= start < stop")
        if self.pool < 1 or self.max_inflight < 0:
            problems.append("pool must be >= 1 and max_inflight >= 0")
        if self.source_ports is not None and not (len(self.source_ports) == 2
                                                  and 1 <= self.source_ports[0] <= self.source_ports[1] <= 65535):
            problems.append(f"source_ports {self.source_ports!r}: want (first, last) within 1-65535")
        try:
            Target.parse(self.target, self.protocol)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError(f"generator {self.name!r}: " + "; ".join(problems))

    @property
    def planned(self) -> int:
        """Requests the schedule has: one every 1/rate s from start, none at or after stop."""
        return math.ceil((self.stop - self.start) * self.rate - 1e-9)

    @property
    def inflight_limit(self) -> int:
        if self.max_inflight:
            return self.max_inflight
        return min(MAX_INFLIGHT, math.ceil(self.rate * self.timeout) + 16)


@dataclass(frozen=True)
class GeneratorSummary:
    """What a generator did: the rate asked against the one achieved (written by the probe at its end)."""

    name: str
    asked_rate: float
    planned: int  # requests the schedule had
    sent: int  # requests started
    achieved_rate: float  # sent / the seconds it ran (stop - start, or less when stopped early)
    late_starts: int  # started later than min(10 ms, half an interval) after their time
    max_lag_ms: float  # the latest start, behind its time
    outcomes: dict[str, int]
    connections_opened: int
    peak_inflight: int
    inflight_limit: int
    stopped_early: bool  # SIGTERM before its stop time

    @property
    def rate_kept(self) -> bool:
        """The machine kept the asked rate: at least 95 % of it achieved."""
        return self.achieved_rate >= 0.95 * self.asked_rate

    @classmethod
    def from_json(cls, data: dict) -> "GeneratorSummary":
        return cls(**{f: data[f] for f in cls.__dataclass_fields__})

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class GeneratorStats:
    """A running generator's counts so far (from its records file), for a progress line."""

    name: str
    ok: int = 0
    failed: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)
    last_t: float = 0.0

    def add(self, records: list[Record]) -> None:
        for record in records:
            self.by_outcome[record.outcome] = self.by_outcome.get(record.outcome, 0) + 1
            if record.ok:
                self.ok += 1
            else:
                self.failed += 1
            self.last_t = max(self.last_t, record.t)


GO_LEAD_S = 0.5  # t0 this long after go() is sent: each probe reads it and waits for t0 by itself


class Generator:
    """One probe process; constructing it does nothing, start() launches it. With t0=None its
    clock starts at go(t0), sent once it is ready: a slow machine's start (seconds in the TCG VM)
    then delays the clock instead of making the first requests late."""

    def __init__(self, spec: GeneratorSpec, t0: float | None, out_dir: Path) -> None:
        self.spec, self.t0, self.out_dir = spec, t0, Path(out_dir)
        self.records_path = self.out_dir / f"{spec.name}.jsonl"
        self.summary_path = self.out_dir / f"{spec.name}.summary.json"
        self.log_path = self.out_dir / f"{spec.name}.log"
        self.config_path = self.out_dir / f"{spec.name}.probe.json"
        self.proc: subprocess.Popen | None = None
        self._stats = GeneratorStats(spec.name)
        self._tail = RecordTail(self.records_path)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        probe = [sys.executable, "-m", "testbed.scenario.probe", str(self.config_path)]
        return ["ip", "netns", "exec", self.spec.netns, *probe] if self.spec.netns else probe

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps({"spec": asdict(self.spec), "t0": self.t0,
                                                "records": str(self.records_path),
                                                "summary": str(self.summary_path)}))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE if self.t0 is None else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=log, start_new_session=True)

    def go(self, t0: float) -> None:
        """Start the clock of a generator made with t0=None (after wait_ready)."""
        self.t0 = t0
        self.proc.stdin.write(f"{t0!r}\n".encode())
        self.proc.stdin.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until the probe says it is set up (it then waits for its start time by itself)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"generator {self.spec.name}: probe not ready after {timeout} s "
                               f"(exit {self.proc.poll()}): {self._log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stats(self) -> GeneratorStats:
        self._stats.add(self._tail.read_new())
        return self._stats

    def wait(self, timeout: float | None = None) -> GeneratorSummary:
        """Until it ends by itself (by default: its stop time, one request timeout and a grace)."""
        if timeout is None:
            timeout = max(0.0, self.t0 + self.spec.stop - time.monotonic()) + self.spec.timeout + DRAIN_GRACE_S + 5
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        return self.summary()

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM by pid (it finishes what is in flight and writes its summary), SIGKILL after grace."""
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace if grace is not None else self.spec.timeout + DRAIN_GRACE_S + 2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def summary(self) -> GeneratorSummary:
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        try:
            return GeneratorSummary.from_json(json.loads(self.summary_path.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise RuntimeError(f"generator {self.spec.name}: no summary ({exc}): {self._log_tail()}") from None

    def records(self) -> list[Record]:
        return load_records(self.records_path)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def with_source_ports(specs: list[GeneratorSpec]) -> list[GeneratorSpec]:
    """Generators that share a namespace get disjoint slices of the ephemeral ports to bind.

    Left to the kernel, two generators of the client pick their ports per destination from
    the same range, and a load balancer that DNATs without SNAT (the external IP) makes a
    connection from client:P to the external IP arrive at a node as client:P to the node's
    NodePort, the same 4-tuple as another generator's connection from client:P straight to
    that NodePort. While the pod (or the node's conntrack) still holds the first in TIME_WAIT,
    the second's SYN is not taken for a new connection and the client retries it 1 s later: a
    timeout neither Service caused (measured before this: 2-3 of 200 requests straight to a
    NodePort failed so, in most runs that also used the external IP)."""
    by_netns: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        if spec.source_ports is None:
            by_netns.setdefault(spec.netns, []).append(i)
    out = list(specs)
    first, last = EPHEMERAL_PORTS
    for members in by_netns.values():
        if len(members) < 2:
            continue
        size = (last - first + 1) // len(members)
        for k, i in enumerate(members):
            out[i] = replace(specs[i], source_ports=(first + k * size, first + (k + 1) * size - 1))
    return out


class Traffic:
    """Several generators started together and always stopped (by pid) on leaving the block."""

    def __init__(self, specs: list[GeneratorSpec], t0: float | None, out_dir: Path) -> None:
        """t0=None: the clock starts GO_LEAD_S after every generator is ready (self.t0 then)."""
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"generator names must be unique: {names}")
        self.t0 = t0
        self.generators = {s.name: Generator(s, t0, out_dir) for s in with_source_ports(specs)}

    def __enter__(self) -> "Traffic":
        try:
            for generator in self.generators.values():
                generator.start()
            for generator in self.generators.values():
                generator.wait_ready()
            if self.t0 is None:
                self.t0 = time.monotonic() + GO_LEAD_S
                for generator in self.generators.values():
                    generator.go(self.t0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def stats(self) -> dict[str, GeneratorStats]:
        return {name: g.stats() for name, g in self.generators.items()}

    def wait(self) -> dict[str, GeneratorSummary]:
        return {name: g.wait() for name, g in self.generators.items()}

    def stop(self) -> None:
        for generator in self.generators.values():
            if generator.alive():
                generator.proc.send_signal(signal.SIGTERM)
        for generator in self.generators.values():
            generator.stop()

    def records(self) -> dict[str, list[Record]]:
        return {name: g.records() for name, g in self.generators.items()}
